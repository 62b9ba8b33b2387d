"""Labels from a GSM8K-style solution's own structure, per character of a document: no model is needed.

A document is a rendered row (pipeline/corpus.py: `Document`): the question is the span of its `question` (or
`problem`) field, the solution the span of its `answer` (or `solution`) field. In the solution, every line but the
final answer line (`#### N`) is a reasoning step, and a reasoning line may hold a calculator annotation
`<<a op b = c>>`. Label tasks, and the characters each labels (-1: none):

- region: question | reasoning (a step's text) | annotation (`<<...>>`, delimiters included) | final_answer
- step: the 1-based index of the reasoning line a character is on (classes 1 ... 7 and 8+)
- operation: inside a well-formed annotation with at least one operator, the set of its operators, written in
  the order `+-*/` (`*`, `*/`, `+-`, ...): the classes are the sets the corpus holds
- role: inside a well-formed annotation: operand | operator | equals | result (`<<`, `>>`, parentheses: none)
- number: every character of the document: number (a digit, a comma or point between two digits, or a point
  opening a number as in `$.50`) | other; a number is a run of such characters (`1,200.5`, `.5`; `$`, signs
  and words such as `three` are not part of one)
- number_source: the characters of a number in the solution other than an annotation's result: question (its
  value is a number of the question) | computed (it is the result of an annotation that ends before it) | new
  (neither); a value that is both is left unlabelled and counted as ambiguous

A well-formed annotation is `expression = number`: numbers, `+ - * /` (a `+` or `-` with no operand before it is
a sign), parentheses and spaces, one `=`. Anything else inside `<<...>>` is malformed: its characters are region
annotation and nothing more, and it is counted. Numbers are written with digits (`three` is not a number here).
A document without a solution field (a plain `{text}` corpus) gets only the `number` task; without a question
field, no question region and no number_source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from pipeline.corpus import Document
from pipeline.params import OPERATORS

QUESTION_FIELDS = ("question", "problem")
SOLUTION_FIELDS = ("answer", "solution")
STEP_CLASSES = ("1", "2", "3", "4", "5", "6", "7", "8+")
TASKS: dict[str, tuple[str, ...]] = {  # the fixed classes; operation's are found in the corpus
    "region": ("question", "reasoning", "annotation", "final_answer"),
    "step": STEP_CLASSES,
    "operation": (),
    "role": ("operand", "operator", "equals", "result"),
    "number": ("other", "number"),
    "number_source": ("question", "computed", "new"),
}
REGION = {name: i for i, name in enumerate(TASKS["region"])}
ROLE = {name: i for i, name in enumerate(TASKS["role"])}
SOURCE = {name: i for i, name in enumerate(TASKS["number_source"])}
DOCUMENT_COUNTS = ("n_steps", "operations", "n_annotations", "n_malformed")  # operations: bit i = OPERATORS[i]

NUMBER = re.compile(r"\d+(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+")  # in an annotation's expression and result
ANNOTATION = re.compile(r"<<([^<>\n]*)>>")
EXPRESSION_CHARS = re.compile(r"[0-9.,+\-*/()\s]*")
RESULT = re.compile(r"\s*-?(?:\d+(?:,\d{3})+(?:\.\d+)?|\d*\.\d+|\d+)\s*")


@dataclass
class OperationClasses:
    """The operator sets met so far, each a class of the operation task (renumbered in canonical order at the end)."""

    index: dict[str, int] = field(default_factory=dict)

    def of(self, operators: set[str]) -> int:
        name = "".join(op for op in OPERATORS if op in operators)
        return self.index.setdefault(name, len(self.index))

    def canonical(self) -> tuple[tuple[str, ...], np.ndarray]:
        """The classes sorted (fewest operators first, then in `+-*/` order), and old index -> new index."""
        names = sorted(self.index, key=lambda name: (len(name), [OPERATORS.index(op) for op in name]))
        remap = np.full(len(self.index) + 1, -1, dtype=np.int8)  # the extra entry keeps -1 at -1
        for new, name in enumerate(names):
            remap[self.index[name]] = new
        return tuple(names), remap


@dataclass
class CharacterLabels:
    """A split's documents, concatenated: per task a label per character, and what each document holds."""

    text: str
    codes: np.ndarray  # the text's code points
    starts: np.ndarray  # [n_docs + 1] where each document starts in the text
    chars: dict[str, np.ndarray]  # task -> int8 [len(text)], -1: no label
    documents: dict[str, np.ndarray]  # DOCUMENT_COUNTS -> int32 [n_docs]
    ambiguous_numbers: int  # solution numbers left unlabelled: their value is in the question and computed before


def label_characters(documents: list[Document], operations: OperationClasses) -> CharacterLabels:
    """Every character of `documents` labelled by every task. The work runs over the whole split at once (lines,
    numbers and lookups as arrays); only annotations are parsed one by one."""
    starts = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum([len(d.text) for d in documents], out=starts[1:])
    text = "".join(d.text for d in documents)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    questions, solutions = (_field_spans(documents, starts, names) for names in (QUESTION_FIELDS, SOLUTION_FIELDS))
    questions[solutions[:, 0] < 0] = -1  # a question without a solution is just text
    chars = {task: np.full(len(codes), -1, dtype=np.int8) for task in TASKS}
    chars["number"][:] = np.where(_number_characters(codes), TASKS["number"].index("number"),
                                  TASKS["number"].index("other"))  # fmt: skip
    has_question = questions[:, 0] >= 0
    _fill(chars["region"], questions[has_question], REGION["question"])
    lines = _solution_lines(codes, solutions)
    _fill(chars["region"], lines.spans, np.where(lines.final, REGION["final_answer"], REGION["reasoning"]))
    steps = ~lines.final
    step_index = _count_within(lines.document[steps])
    _fill(chars["step"], lines.spans[steps], np.minimum(step_index, len(STEP_CLASSES) - 1))
    counts = {name: np.zeros(len(documents), dtype=np.int32) for name in DOCUMENT_COUNTS}
    np.add.at(counts["n_steps"], lines.document[steps], 1)
    found = _annotations(text, solutions, operations, chars, counts)
    sources = _number_sources(text, codes, starts, questions, solutions, found)
    labelled = sources.source >= 0
    _fill(chars["number_source"], sources.spans[labelled], sources.source[labelled])
    return CharacterLabels(text, codes, starts, chars, counts, int((~labelled).sum()))


def _field_spans(documents: list[Document], starts: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """[n_docs, 2] where the first of the fields `names` each document has lies in the text; -1 where none."""
    spans = np.full((len(documents), 2), -1, dtype=np.int64)
    for i, document in enumerate(documents):
        span = next((document.fields[name] for name in names if name in document.fields), None)
        if span is not None:
            spans[i] = (starts[i] + span[0], starts[i] + span[1])
    return spans


@dataclass
class Lines:
    spans: np.ndarray  # [n, 2] the non-empty lines of every solution, in text order, without their newline
    document: np.ndarray  # [n] whose
    final: np.ndarray  # [n] bool: the final answer line (`#### N`)


def _solution_lines(codes: np.ndarray, solutions: np.ndarray) -> Lines:
    """The non-empty lines of every solution, found from the newlines' positions."""
    has = np.flatnonzero(solutions[:, 0] >= 0)
    if not len(has):
        return Lines(np.zeros((0, 2), dtype=np.int64), has, np.zeros(0, dtype=bool))
    newlines = np.flatnonzero(codes == ord("\n"))
    owner = np.searchsorted(solutions[has, 0], newlines, side="right") - 1  # the last solution starting before
    inside = (owner >= 0) & (newlines < solutions[has[np.maximum(owner, 0)], 1])
    first = np.concatenate([solutions[has, 0], newlines[inside] + 1])
    document = np.concatenate([has, has[owner[inside]]])
    order = np.argsort(first, kind="stable")
    first, document = first[order], document[order]
    next_newline = np.searchsorted(newlines, first)
    ends = np.minimum(np.append(newlines, len(codes))[next_newline], solutions[document, 1])
    text_chars = np.concatenate([[0], np.cumsum(~is_space(codes))])  # non-space characters before each position
    nonempty = text_chars[ends] > text_chars[np.maximum(first, 0)]
    first, ends, document = first[nonempty], ends[nonempty], document[nonempty]
    leading = np.flatnonzero(~is_space(codes))
    opening = leading[np.minimum(np.searchsorted(leading, first), len(leading) - 1)]  # each line's first character
    hashes = np.zeros(len(first), dtype=bool)
    if len(codes) >= 4:
        four = (codes[:-3] == 35) & (codes[1:-2] == 35) & (codes[2:-1] == 35) & (codes[3:] == 35)  # "####"
        hashes = (opening + 4 <= ends) & four[np.minimum(opening, len(four) - 1)]
    return Lines(np.stack([first, ends], axis=1).reshape(-1, 2), document, hashes)


def _count_within(groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of `groups` (sorted)."""
    if not len(groups):
        return groups
    starts = np.flatnonzero(np.diff(groups, prepend=groups[0] - 1))
    return np.arange(len(groups)) - np.repeat(starts, np.diff(np.append(starts, len(groups))))


@dataclass
class Annotations:
    results: np.ndarray  # [n, 4] per well-formed annotation: document, its end, its result's span
    no_source: np.ndarray  # [m, 2] spans whose numbers have no source: results and malformed annotations


def _annotations(text: str, solutions: np.ndarray, operations: OperationClasses, chars: dict[str, np.ndarray],
                 counts: dict[str, np.ndarray]) -> Annotations:  # fmt: skip
    """Parse every annotation of every solution: region, role and operation labels, and the counts."""
    results, no_source = [], []
    region, role, operation = chars["region"], chars["role"], chars["operation"]
    has = np.flatnonzero(solutions[:, 0] >= 0)
    for doc in has.tolist():
        start, end = solutions[doc]
        opened = text.count("<<", start, end)
        for match in ANNOTATION.finditer(text, start, end):
            opened -= 1
            counts["n_annotations"][doc] += 1
            region[match.start() : match.end()] = REGION["annotation"]
            parsed = _parse(match.group(1), match.start(1))
            if parsed is None:
                counts["n_malformed"][doc] += 1
                no_source.append(match.span())
                continue
            runs, used, result = parsed
            for value, first, last in runs:
                role[first:last] = value
            if used:
                counts["operations"][doc] |= sum(1 << OPERATORS.index(op) for op in used)
                operation[match.start() : match.end()] = operations.of(used)
            results.append((doc, match.end(), *result))
            no_source.append(result)
        counts["n_annotations"][doc] += opened  # `<<` never closed on its line: malformed
        counts["n_malformed"][doc] += opened
    return Annotations(np.array(results, dtype=np.int64).reshape(-1, 4),
                       np.array(no_source, dtype=np.int64).reshape(-1, 2))  # fmt: skip


@dataclass
class Sources:
    spans: np.ndarray  # [n, 2] solution numbers that can have a source
    source: np.ndarray  # [n] their source, -1 where ambiguous


def _number_sources(text: str, codes: np.ndarray, starts: np.ndarray, questions: np.ndarray,
                    solutions: np.ndarray, annotations: Annotations) -> Sources:  # fmt: skip
    """Every solution number of a document with a question, but annotations' results and numbers in malformed
    annotations, with its source. Each value becomes an integer key, and "is a number of the question" and
    "was computed before" become lookups of (document, value) pairs."""
    number = _number_characters(codes)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], number, [False]]).astype(np.int8)))
    spans = edges.reshape(-1, 2)  # every run of number characters
    document = np.searchsorted(starts, spans[:, 0], side="right") - 1
    in_question, in_solution = _within(spans, questions[document]), _within(spans, solutions[document])
    in_solution &= questions[document, 0] >= 0
    results = annotations.results
    bounds = np.concatenate([spans, results[:, 2:]])  # the numbers, then the results, as written
    keys = _value_keys([text[a:b] for a, b in zip(bounds[:, 0].tolist(), bounds[:, 1].tolist(), strict=True)])
    number_keys, result_keys = keys[: len(spans)], keys[len(spans) :]
    width = int(keys.max(initial=0)) + 1
    question_pairs = document[in_question] * width + number_keys[in_question]
    solution = np.flatnonzero(in_solution & ~_inside(spans[:, 0], annotations.no_source))
    pairs = document[solution] * width + number_keys[solution]
    copied = np.isin(pairs, question_pairs)
    derived = _computed_before(pairs, spans[solution, 0], results[:, 0] * width + result_keys, results[:, 1])
    source = np.where(copied, SOURCE["question"], np.where(derived, SOURCE["computed"], SOURCE["new"]))
    return Sources(spans[solution], np.where(copied & derived, -1, source).astype(np.int8))


def _computed_before(pairs: np.ndarray, positions: np.ndarray, result_pairs: np.ndarray,
                     result_ends: np.ndarray) -> np.ndarray:  # fmt: skip
    """Whether some result with the same (document, value) pair ends at or before each position."""
    if not len(result_pairs):
        return np.zeros(len(pairs), dtype=bool)
    order = np.lexsort((result_ends, result_pairs))  # by pair, then by where the annotation ends
    unique, first = np.unique(result_pairs[order], return_index=True)
    earliest = result_ends[order][first]
    at = np.minimum(np.searchsorted(unique, pairs), len(unique) - 1)
    return (unique[at] == pairs) & (earliest[at] <= positions)


def _value_keys(numbers: list[str]) -> np.ndarray:
    """An integer per number, equal for equal values (`1,200` and `1200.0`; `-3` is not `3`)."""
    names: dict[str, int] = {}  # the same few numbers recur: each distinct spelling is parsed once
    spelling = np.fromiter((names.setdefault(n, len(names)) for n in numbers), dtype=np.int64, count=len(numbers))
    values = [_value(name) for name in names]
    return np.unique(values, return_inverse=True)[1].astype(np.int64).reshape(-1)[spelling]


def _value(number: str) -> str:
    """A number's value, spelled one way (`1,200` and `1200.0`: `1200.0`); a run that is no one number
    (`1.2.3`) stands for itself."""
    try:
        return repr(round(float(number.replace(",", "")), 6))
    except ValueError:
        return f"as written: {number}"


def _within(spans: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Whether each span lies within the bounds on its row (a bound of -1: none)."""
    return (bounds[:, 0] >= 0) & (spans[:, 0] >= bounds[:, 0]) & (spans[:, 1] <= bounds[:, 1])


def _inside(positions: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Whether each position lies in one of `spans` (sorted, not overlapping)."""
    if not len(spans):
        return np.zeros(len(positions), dtype=bool)
    at = np.searchsorted(spans[:, 0], positions, side="right") - 1
    return (at >= 0) & (positions < spans[np.maximum(at, 0), 1])


def _fill(target: np.ndarray, spans: np.ndarray, values) -> None:
    """target[start:end] = value for every span, in one write (the spans of one call do not overlap)."""
    lengths = spans[:, 1] - spans[:, 0]
    first = np.repeat(spans[:, 0] - np.cumsum(lengths) + lengths, lengths)
    target[first + np.arange(len(first))] = np.repeat(np.broadcast_to(np.asarray(values, np.int8), len(spans)),
                                                      lengths)  # fmt: skip


def _number_characters(codes: np.ndarray) -> np.ndarray:
    """Whether each character is part of a number: a digit, a comma or point between two digits, or a point
    before a digit that opens a number (`$.50`)."""
    digit = (codes >= ord("0")) & (codes <= ord("9"))
    before, after = np.zeros_like(digit), np.zeros_like(digit)  # a digit just before / just after
    before[1:], after[:-1] = digit[:-1], digit[1:]
    point = codes == ord(".")
    return digit | ((point | (codes == ord(","))) & before & after) | (point & after & ~before)


WHITESPACE = np.array([ord(c) for c in map(chr, range(0x3001)) if c.isspace()], dtype=np.uint32)


def is_space(codes: np.ndarray) -> np.ndarray:
    """Whether each code point is whitespace (str.isspace)."""
    return np.isin(codes, WHITESPACE)


def _parse(inner: str, base: int) -> tuple[list[tuple[int, int, int]], set[str], tuple[int, int]] | None:
    """A well-formed annotation's (role, start, end) runs of characters, its operators, and its result's span;
    None if malformed. `base`: where `inner` starts in the document."""
    if inner.count("=") != 1:
        return None
    equals = inner.index("=")
    expression, result = inner[:equals], inner[equals + 1 :]
    if not EXPRESSION_CHARS.fullmatch(expression) or not RESULT.fullmatch(result) or not NUMBER.search(expression):
        return None
    roles: list[tuple[int, int, int]] = []
    used: set[str] = set()
    after_operand = False  # whether the last character that was not a space ends an operand
    for i, char in enumerate(expression):
        role = None
        if char.isdigit() or char in ".,":
            role, after_operand = ROLE["operand"], True
        elif char == ")":
            after_operand = True
        elif char in OPERATORS:
            if after_operand:
                role = ROLE["operator"]
                used.add(char)
            elif char in "+-":  # a sign belongs to its operand
                role = ROLE["operand"]
            else:
                return None
            after_operand = False
        elif char == "(":
            after_operand = False
        if role is None:
            continue
        if roles and roles[-1][0] == role and roles[-1][2] == base + i:  # the run goes on
            roles[-1] = (role, roles[-1][1], base + i + 1)
        else:
            roles.append((role, base + i, base + i + 1))
    if not after_operand:  # the expression ends in an operator
        return None
    stripped = result.strip()
    result_start = base + equals + 1 + result.index(stripped)
    roles += [(ROLE["equals"], base + equals, base + equals + 1), (ROLE["result"], result_start,
              result_start + len(stripped))]  # fmt: skip
    return roles, used, (result_start, result_start + len(stripped))
