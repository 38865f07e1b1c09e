"""Keep the documentation true: run its curl examples against a live stack.

How an example is found, in README.md, docs/queue-api.md, docs/api.md and
docs/operations.md:

- It sits in a fenced block tagged ``sh``, ``bash``, ``shell`` or ``console``.
- Its line starts with ``curl `` or ``$ curl ``. A line that ends with a backslash
  continues on the next line, as in a shell.
- A pipe (``| jq .``) and everything after it are not run.
- It addresses the queue at ``127.0.0.1:8500`` and the API at ``127.0.0.1:8000``
  (``localhost`` works too). The test rewrites these ports to those of the stack it
  starts, and fails an example that names any other host or port.
- ``$TOKEN`` is replaced with a placeholder. The stack runs without queue tokens,
  as ``make run`` does, so the queue ignores the ``Authorization`` header.

What an example must return:

- By default, an HTTP status below 400.
- ``<!-- docs-test: expect 404 -->`` on the line before the fence: every example of
  the block must return exactly that status. Use it for examples that show an error.
- In a ``console`` block, output under a ``$ curl`` line that shows a status of 400
  or more, as an ``HTTP/1.1 404`` status line or a problem+json body with
  ``"status": 404``, sets the expected status of that example in the same way.
- ``<!-- docs-test: skip -->`` on the line before the fence: the block is not run.
  Use it for examples that would damage the live stack (deleting the telemetry
  queue) or that address a port the test cannot know (a collector's ephemeral port).
  These HTML comments do not show in rendered Markdown.

Examples run in document order, against one stack of one streamer and one collector
streaming the bundled sample file, once the API serves every GPU of that file.

The module also keeps docs/operations.md in step with the code, in both directions:

- Environment variables: every variable the product code reads (found in its
  syntax tree) and every variable a console script's ``--help`` names has a row,
  and every variable the page names is read by the code, the Makefile or
  circus.ini.
- Metrics: every metric the code constructs is in the metrics tables with its type
  and labels, and every metric in the tables is constructed by the code. What the
  live processes export at ``/metrics`` must match the tables too.
- Every ``make <target>`` named in the docs exists in the Makefile.
"""

from __future__ import annotations

import ast
import csv
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]

# The stack helper of the end-to-end tests lives in their non-package test folder.
sys.path.insert(0, str(ROOT / "tests" / "system"))
from system_stack import Stack, wait_until

CURL_DOCS = ("README.md", "docs/queue-api.md", "docs/api.md", "docs/operations.md")
SHELL_FENCES = {"sh", "bash", "shell", "console"}
DOCUMENTED_QUEUE_PORT = 8500
DOCUMENTED_API_PORT = 8000
TOKEN_PLACEHOLDER = "docs-example-token"
SAMPLE_CSV = ROOT / "streamer" / "data" / "sample_dcgm.csv"
CURL_TIMEOUT_S = 25  # above the longest documented long-poll, 20 s

_MARKER = re.compile(r"<!--\s*docs-test:\s*(skip|expect\s+(\d{3}))\s*-->")
_FENCE = re.compile(r"^\s*```\s*([A-Za-z0-9_-]*)")
_MAKE_TARGET = re.compile(r"(?:`|^\s*(?:\$\s+)?)make\s+([a-z](?:[a-z0-9_-]*[a-z0-9])?)", re.MULTILINE)
_MAKEFILE_RULE = re.compile(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", re.MULTILINE)
_ENV_NAME = re.compile(r"\b(?:QUEUE|STREAMER|COLLECTOR|API|CIRCUS|DATABASE)_[A-Z0-9_]*[A-Z0-9]\b")
# In --help, a variable follows the opening bracket of "(QUEUE_PORT, default 8500)";
# the usage line's metavars (QUEUE_URLS) do not.
_HELP_VARIABLE = re.compile(r"[(\[]((?:QUEUE|STREAMER|COLLECTOR|API)_[A-Z0-9_]*[A-Z0-9]|DATABASE_URL)\b")
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_TRANSCRIPT_STATUS = re.compile(r'^HTTP/[\d.]+ (\d{3})\b|"status":\s*(\d{3})\b')


@dataclass(frozen=True)
class CurlExample:
    """One curl command of a doc, with the status its block promises."""

    doc: str
    line: int
    command: str
    expected_status: int | None  # None: any status below 400
    skip: bool

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def extract_curl_examples(doc: str, text: str) -> list[CurlExample]:
    """Extract the curl examples of one Markdown text, by the conventions in this module's docstring."""
    examples: list[CurlExample] = []
    lines = text.splitlines()
    marker: re.Match[str] | None = None
    in_shell_block = False
    in_other_block = False
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence and not in_shell_block and not in_other_block:
            if fence.group(1) in SHELL_FENCES:
                in_shell_block = True
            else:
                in_other_block = True
                marker = None
            index += 1
            continue
        if fence:
            in_shell_block = in_other_block = False
            marker = None
            index += 1
            continue

        if not in_shell_block:
            found = _MARKER.search(line)
            if found:
                marker = found
            elif line.strip() and not in_other_block:
                marker = None
            index += 1
            continue

        stripped = line.strip()
        if stripped.startswith("$ "):
            stripped = stripped[2:].lstrip()
        if not stripped.startswith("curl "):
            index += 1
            continue
        start = index + 1
        parts = [stripped]
        # A trailing backslash or an open quote continues the command, as in a shell.
        while (parts[-1].endswith("\\") or not _quotes_balanced(" ".join(parts))) and index + 1 < len(lines):
            if parts[-1].endswith("\\"):
                parts[-1] = parts[-1][:-1].rstrip()
            index += 1
            parts.append(lines[index].strip())
        expected = int(marker.group(2)) if marker and marker.group(2) else None
        if expected is None and line.strip().startswith("$ "):
            expected = _status_shown_after(lines, index + 1)
        examples.append(
            CurlExample(
                doc=doc,
                line=start,
                command=" ".join(parts),
                expected_status=expected,
                skip=bool(marker and marker.group(1) == "skip"),
            )
        )
        index += 1
    return examples


def _quotes_balanced(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:
        return False
    return True


def _status_shown_after(lines: list[str], first: int) -> int | None:
    """Return the error status that a console transcript shows below a command, if any."""
    for line in lines[first:]:
        if line.strip().startswith(("$ ", "```")):
            return None
        status_match = _TRANSCRIPT_STATUS.search(line.strip())
        if status_match:
            status = int(status_match.group(1) or status_match.group(2))
            return status if status >= 400 else None
    return None


def collect_examples() -> list[CurlExample]:
    examples: list[CurlExample] = []
    for doc in CURL_DOCS:
        path = ROOT / doc
        if path.is_file():
            examples.extend(extract_curl_examples(doc, path.read_text()))
    return examples


def curl_argv(example: CurlExample, *, queue_port: int, api_port: int) -> list[str]:
    """Build the curl argv of an example, aimed at the stack. Fail the test when it names another host or port."""
    words = shlex.split(example.command)
    if "|" in words:
        words = words[: words.index("|")]
    for word in words:
        if word in {";", "&&", "||", ">", ">>", "-o", "--output", "-w", "--write-out"}:
            pytest.fail(f"{example.id}: {word!r} is not allowed in a documented curl example")

    ports = {DOCUMENTED_QUEUE_PORT: queue_port, DOCUMENTED_API_PORT: api_port}
    argv = []
    for word in words:
        word = _VARIABLE.sub(lambda match: _expand(example, match), word)
        for documented, actual in ports.items():
            for host in ("127.0.0.1", "localhost"):
                word = word.replace(f"//{host}:{documented}/", f"//127.0.0.1:{actual}/")
        if "://" in word and not any(word.startswith(f"http://127.0.0.1:{port}/") for port in ports.values()):
            pytest.fail(
                f"{example.id}: {word!r} is neither the queue (port {DOCUMENTED_QUEUE_PORT}) nor the API "
                f"(port {DOCUMENTED_API_PORT}) on 127.0.0.1; mark the block with <!-- docs-test: skip -->"
            )
        argv.append(word)
    return [*argv, "--silent", "--show-error", "--max-time", str(CURL_TIMEOUT_S), "--write-out", "\n%{http_code}"]


def _expand(example: CurlExample, match: re.Match[str]) -> str:
    name = match.group(1) or match.group(2)
    if name != "TOKEN":
        pytest.fail(f"{example.id}: unknown shell variable ${name}; examples may use only $TOKEN")
    return TOKEN_PLACEHOLDER


def sample_gpu_count() -> int:
    with SAMPLE_CSV.open(newline="") as handle:
        return len({row["uuid"] for row in csv.DictReader(handle)})


@pytest.fixture(scope="module")
def docs_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A running stack whose API serves every GPU of the bundled sample file."""
    data_dir = tmp_path_factory.mktemp("docs-stack")
    stack = Stack(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'telemetry.db'}",
        csv=SAMPLE_CSV,
    )
    try:
        stack.start()
        expected = sample_gpu_count()
        wait_until(
            lambda: _gpu_count(stack.api_url) >= expected,
            timeout_s=30,
            what=f"the API to serve all {expected} GPUs of {SAMPLE_CSV.name}",
        )
        yield stack
    finally:
        status = stack.stop()
        if status not in (0, None):
            print(stack.log()[-5000:])


def _gpu_count(api_url: str) -> int:
    try:
        response = httpx.get(f"{api_url}/api/v1/gpus", timeout=2)
    except httpx.HTTPError:
        return 0
    return int(response.json()["count"]) if response.status_code == 200 else 0


# Extraction rules


def test_extract_follows_markers_and_continuations() -> None:
    markdown_lines = [
        "```sh",
        "curl -s http://127.0.0.1:8500/v1/queues \\",
        '  -H "Authorization: Bearer $TOKEN" | jq .',
        "make run",
        "```",
        "<!-- docs-test: expect 404 -->",
        "```console",
        "$ curl http://127.0.0.1:8000/api/v1/gpus/unknown",
        '{"status": 404}',
        "```",
        "```console",
        "$ curl -i http://127.0.0.1:8000/api/v1/gpus/unknown",
        "HTTP/1.1 404 NOT FOUND",
        "$ curl http://127.0.0.1:8000/healthz",
        '{"status": "ok"}',
        "```",
        "<!-- docs-test: skip -->",
        "```bash",
        "curl -X DELETE http://127.0.0.1:8500/v1/queues/telemetry",
        "```",
        "```json",
        '"curl http://127.0.0.1:8000/ is not a command here"',
        "```",
        "```sh",
        "curl http://127.0.0.1:8000/healthz",
        "```",
    ]
    examples = extract_curl_examples("doc.md", "\n".join(markdown_lines))

    assert [example.line for example in examples] == [2, 8, 12, 14, 19, 25]
    assert examples[0].command == 'curl -s http://127.0.0.1:8500/v1/queues -H "Authorization: Bearer $TOKEN" | jq .'
    assert examples[0].expected_status is None
    assert examples[1].expected_status == 404
    assert examples[2].expected_status == 404
    assert examples[3].expected_status is None
    assert examples[4].skip
    assert not examples[5].skip
    assert examples[5].expected_status is None


def test_curl_argv_rewrites_ports_and_token() -> None:
    example = CurlExample("doc.md", 1, 'curl http://localhost:8500/v1/queues -H "Authorization: Bearer $TOKEN" | jq .', None, False)

    argv = curl_argv(example, queue_port=40001, api_port=40002)

    assert argv[:4] == ["curl", "http://127.0.0.1:40001/v1/queues", "-H", f"Authorization: Bearer {TOKEN_PLACEHOLDER}"]
    assert "|" not in argv


def test_curl_argv_rejects_other_hosts() -> None:
    example = CurlExample("doc.md", 1, "curl http://127.0.0.1:9102/metrics", None, False)

    with pytest.raises(pytest.fail.Exception, match="mark the block"):
        curl_argv(example, queue_port=40001, api_port=40002)


def test_docs_contain_curl_examples() -> None:
    examples = collect_examples()
    docs = {example.doc for example in examples}

    assert "docs/queue-api.md" in docs
    assert "docs/operations.md" in docs
    assert any(example.expected_status for example in examples), "no example is documented as an error"


# Examples against a live stack


@pytest.mark.slow
@pytest.mark.parametrize("example", collect_examples(), ids=lambda example: example.id)
def test_curl_example_runs(example: CurlExample, docs_stack: Stack) -> None:
    if example.skip:
        pytest.skip(f"{example.id} is marked docs-test: skip")
    argv = curl_argv(example, queue_port=docs_stack.queue_port, api_port=docs_stack.api_port)

    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=CURL_TIMEOUT_S + 5)

    assert result.returncode == 0, f"{example.id}: curl failed ({result.returncode}): {result.stderr}"
    body, _, status_text = result.stdout.rpartition("\n")
    status = int(status_text)
    if example.expected_status is None:
        assert status < 400, f"{example.id}: {example.command}\nreturned {status}: {body[:500]}"
    else:
        assert status == example.expected_status, f"{example.id}: {example.command}\nreturned {status}: {body[:500]}"


# Metrics

_METRIC_ROW = re.compile(r"^\| `([a-z_:]+)` \| (counter|gauge|histogram|summary) \| ([^|]*) \|", re.MULTILINE)
_HEALTH_LOG_LINE = re.compile(r"health and metrics (?:endpoints )?on (http://127\.0\.0\.1:\d+)")


def documented_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """Map each metric of the tables in docs/operations.md to its type and label names."""
    metrics = {}
    for name, kind, labels_cell in _METRIC_ROW.findall((ROOT / "docs" / "operations.md").read_text()):
        # A labels cell is "none", or label names in backticks, maybe followed by "(values)".
        label_names = frozenset(re.findall(r"`(\w+)`", labels_cell.split("(")[0]))
        metrics[name] = (kind, label_names)
    return metrics


def _metrics_urls(stack: Stack) -> list[str]:
    """Return the /metrics URLs of every process of the stack, waiting for the ephemeral ones."""
    found: list[str] = []

    def logged_both() -> bool:
        found[:] = _HEALTH_LOG_LINE.findall(stack.log())
        return len(found) >= 2

    wait_until(logged_both, timeout_s=30, what="the streamer and collector to log their metrics ports")
    return [f"{url}/metrics" for url in (stack.queue_url, stack.api_url, *found)]


@pytest.mark.slow
def test_exported_metrics_documented(docs_stack: Stack) -> None:
    documented = documented_metrics()
    exported: dict[str, tuple[str, set[frozenset[str]]]] = {}
    for url in _metrics_urls(docs_stack):
        text = httpx.get(url, timeout=10).text
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):
                continue  # prometheus-client's start time of a counter or histogram
            name = f"{family.name}_total" if family.type == "counter" else family.name
            label_sets = {frozenset(sample.labels) - {"le"} for sample in family.samples}
            exported[name] = (family.type, label_sets)

    for prefix in ("queue_", "streamer_", "telemetry_collector_", "api_"):
        assert any(name.startswith(prefix) for name in exported), f"no {prefix}* metric scraped: {sorted(exported)}"
    for name, (kind, label_sets) in sorted(exported.items()):
        assert name in documented, f"{name} is exported but missing from the metrics tables of docs/operations.md"
        documented_kind, documented_labels = documented[name]
        assert kind == documented_kind, f"{name} is a {kind}, but docs/operations.md says {documented_kind}"
        for labels in label_sets:
            assert labels == documented_labels, (
                f"{name} has labels {sorted(labels)}, but docs/operations.md says {sorted(documented_labels)}"
            )


# Names the docs rely on


def _doc_paths() -> list[Path]:
    paths = sorted((ROOT / "docs").glob("*.md"))
    readme = ROOT / "README.md"
    return [readme, *paths] if readme.is_file() else paths


def _documented_make_targets() -> list[tuple[str, str]]:
    found = set()
    for path in _doc_paths():
        for match in _MAKE_TARGET.finditer(path.read_text()):
            found.add((str(path.relative_to(ROOT)), match.group(1)))
    return sorted(found)


@pytest.mark.parametrize(("doc", "target"), _documented_make_targets(), ids=lambda value: value)
def test_documented_make_target_exists(doc: str, target: str) -> None:
    rules = set(_MAKEFILE_RULE.findall((ROOT / "Makefile").read_text()))

    assert target in rules, f"{doc} names `make {target}`, which the Makefile does not define"


def _code_text() -> str:
    sources = [ROOT / "Makefile", ROOT / "circus.ini"]
    for package in ("queue_server", "streamer", "collector", "api", "telemetry", "migrations"):
        sources.extend((ROOT / package).rglob("*.py"))
    return "\n".join(path.read_text() for path in sources)


@pytest.mark.parametrize("script", ["telemetry-queue", "telemetry-streamer", "telemetry-collector", "telemetry-api"])
def test_help_variables_documented(script: str) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / script), "--help"],
        check=True,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "400"},
        timeout=60,
    )
    operations = (ROOT / "docs" / "operations.md").read_text()

    names = sorted(set(_HELP_VARIABLE.findall(result.stdout)))
    assert names, f"{script} --help names no environment variable"
    undocumented = [name for name in names if f"`{name}`" not in operations]
    assert undocumented == [], f"{script} --help names variables missing from docs/operations.md: {undocumented}"


def test_operations_variables_exist_in_code() -> None:
    names = sorted(set(_ENV_NAME.findall((ROOT / "docs" / "operations.md").read_text())))
    code = _code_text()

    assert len(names) > 30, f"expected the configuration tables, found only {names}"
    missing = [name for name in names if not re.search(rf"\b{name}\b", code)]
    assert missing == [], f"docs/operations.md names variables that no code reads: {missing}"


# Names the code defines, read from its syntax tree

PRODUCT_PACKAGES = ("queue_server", "streamer", "collector", "api", "telemetry", "migrations")
_ENV_READERS = {"env_str", "env_int", "env_float", "env_bool", "env_list", "getenv"}
_METRIC_TYPES = {
    "Counter": "counter",
    "CounterMetricFamily": "counter",
    "Gauge": "gauge",
    "GaugeMetricFamily": "gauge",
    "Histogram": "histogram",
    "HistogramMetricFamily": "histogram",
    "Summary": "summary",
    "SummaryMetricFamily": "summary",
}


#: The metrics of prometheus-client's own collectors, which the code registers by class.
_LIBRARY_COLLECTORS: dict[str, list[tuple[str, str, frozenset[str]]]] = {
    "ProcessCollector": [
        ("process_cpu_seconds_total", "counter", frozenset()),
        ("process_virtual_memory_bytes", "gauge", frozenset()),
        ("process_resident_memory_bytes", "gauge", frozenset()),
        ("process_start_time_seconds", "gauge", frozenset()),
        ("process_open_fds", "gauge", frozenset()),
        ("process_max_fds", "gauge", frozenset()),
    ],
    "GCCollector": [
        ("python_gc_objects_collected_total", "counter", frozenset({"generation"})),
        ("python_gc_objects_uncollectable_total", "counter", frozenset({"generation"})),
        ("python_gc_collections_total", "counter", frozenset({"generation"})),
    ],
    "PlatformCollector": [
        ("python_info", "gauge", frozenset({"implementation", "major", "minor", "patchlevel", "version"})),
    ],
}


@dataclass(frozen=True)
class RegisteredMetric:
    """A metric constructor call in the code: its name, type and labels."""

    pattern: str  # the name, or a regex for a name built by an f-string
    exact: bool
    kind: str
    labels: frozenset[str] | None  # None: the label names are not literals
    where: str


def _product_trees() -> Iterator[tuple[str, ast.Module]]:
    for package in PRODUCT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield str(path.relative_to(ROOT)), ast.parse(path.read_text(), filename=str(path))


def _called_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _first_string(args: list[ast.expr]) -> str | None:
    if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
        return args[0].value
    return None


def env_variables_read_by_code() -> dict[str, list[str]]:
    """Map each environment variable that the product code reads by a literal name to its places.

    A read is a call of a ``telemetry.settings`` helper or of ``os.getenv``, or an
    ``environ.get(...)`` or ``environ[...]`` on any mapping named ``environ``.
    """
    found: dict[str, list[str]] = {}
    for where, tree in _product_trees():
        for node in ast.walk(tree):
            name = None
            if isinstance(node, ast.Call):
                called = _called_name(node.func)
                if called in _ENV_READERS:
                    name = _first_string(node.args)
                elif called == "get" and isinstance(node.func, ast.Attribute):
                    if _called_name(node.func.value) == "environ":
                        name = _first_string(node.args)
            elif isinstance(node, ast.Subscript) and _called_name(node.value) == "environ":
                name = _first_string([node.slice])
            if name is not None:
                found.setdefault(name, []).append(f"{where}:{node.lineno}")
    return found


def _module_string_sequences(tree: ast.Module) -> dict[str, list[str]]:
    """Return the module-level constants that are tuples or lists of strings, such as ``LABELS``."""
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Tuple | ast.List):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            values = [item.value for item in node.value.elts if isinstance(item, ast.Constant)]
            if len(values) == len(node.value.elts) and all(isinstance(value, str) for value in values):
                for target in targets:
                    if isinstance(target, ast.Name):
                        constants[target.id] = values
    return constants


def _label_names(call: ast.Call, constants: dict[str, list[str]]) -> frozenset[str] | None:
    """Return the label names of a metric constructor, or None when they are not literals."""
    labels: ast.expr | None = None
    for keyword in call.keywords:
        if keyword.arg in ("labels", "labelnames"):
            labels = keyword.value
    if labels is None and len(call.args) >= 3:
        labels = call.args[2]
    if labels is None:
        return frozenset()
    if isinstance(labels, ast.Name):
        return frozenset(constants[labels.id]) if labels.id in constants else None
    if not isinstance(labels, ast.Tuple | ast.List):
        return None
    names: set[str] = set()
    for item in labels.elts:
        if isinstance(item, ast.Constant) and isinstance(item.value, str):
            names.add(item.value)
        elif isinstance(item, ast.Starred) and isinstance(item.value, ast.Name) and item.value.id in constants:
            names.update(constants[item.value.id])
        else:
            return None
    return frozenset(names)


def metrics_registered_by_code() -> list[RegisteredMetric]:
    """List every prometheus-client metric or metric family the product code constructs."""
    metrics = []
    for where, tree in _product_trees():
        constants = _module_string_sequences(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _called_name(node.func) in _LIBRARY_COLLECTORS:
                for name, kind, labels in _LIBRARY_COLLECTORS[_called_name(node.func) or ""]:
                    metrics.append(RegisteredMetric(name, True, kind, labels, f"{where}:{node.lineno}"))
                continue
            if not isinstance(node, ast.Call) or _called_name(node.func) not in _METRIC_TYPES or not node.args:
                continue
            kind = _METRIC_TYPES[_called_name(node.func) or ""]
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                pattern, exact = name.value, True
            elif isinstance(name, ast.JoinedStr):
                # An f-string name such as f"queue_{name}_messages" matches any documented fill.
                parts = [
                    re.escape(part.value) if isinstance(part, ast.Constant) else "[a-z_]+" for part in name.values
                ]
                pattern, exact = "".join(parts), False
            else:
                continue  # collections.Counter and other calls with no metric name
            if kind == "counter" and not pattern.endswith("_total"):
                pattern += "_total"
            labels = _label_names(node, constants)
            metrics.append(RegisteredMetric(pattern, exact, kind, labels, f"{where}:{node.lineno}"))
    return metrics


def test_code_scan_finds_variables_and_metrics() -> None:
    variables = env_variables_read_by_code()
    metrics = metrics_registered_by_code()
    by_pattern = {metric.pattern: metric for metric in metrics}

    assert "QUEUE_TOKENS_FILE" in variables  # environ["QUEUE_TOKENS_FILE"]
    assert "STREAMER_CSV" in variables  # env_str("STREAMER_CSV", ...)
    assert "DATABASE_URL" in variables  # environ.get("DATABASE_URL")
    assert by_pattern["streamer_rows_rejected_total"].labels == {"reason"}
    assert by_pattern["queue_wal_fsync_seconds"].kind == "histogram"
    assert by_pattern["queue_push_deliveries_total"].labels == {"queue", "subscription", "outcome"}
    assert not by_pattern["queue_[a-z_]+_messages"].exact
    assert by_pattern["python_gc_collections_total"].labels == {"generation"}


def test_code_variables_documented() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()

    undocumented = {
        name: places for name, places in sorted(env_variables_read_by_code().items()) if f"`{name}`" not in operations
    }

    assert undocumented == {}, f"the code reads variables missing from docs/operations.md: {undocumented}"


def test_registered_metrics_documented() -> None:
    documented = documented_metrics()

    for metric in metrics_registered_by_code():
        if not metric.exact:
            # An f-string name may also match other families, so one documented fill must agree.
            fills = [
                name
                for name, (kind, labels) in documented.items()
                if re.fullmatch(metric.pattern, name) and kind == metric.kind and metric.labels in (None, labels)
            ]
            assert fills, (
                f"{metric.where} registers {metric.pattern} ({metric.kind}), which docs/operations.md does not list"
            )
            continue
        name = metric.pattern
        assert name in documented, f"{metric.where} registers {name}, which docs/operations.md does not list"
        documented_kind, documented_labels = documented[name]
        assert documented_kind == metric.kind, f"{metric.where}: {name} is a {metric.kind}, not {documented_kind}"
        if metric.labels is not None:
            assert documented_labels == metric.labels, (
                f"{metric.where}: {name} has labels {sorted(metric.labels)}, "
                f"but docs/operations.md says {sorted(documented_labels)}"
            )


def test_documented_metrics_registered() -> None:
    registered = metrics_registered_by_code()

    unknown = [
        name for name in sorted(documented_metrics()) if not any(re.fullmatch(m.pattern, name) for m in registered)
    ]

    assert unknown == [], f"docs/operations.md lists metrics that no code registers: {unknown}"
