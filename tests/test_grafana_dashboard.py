"""The Grafana dashboard (monitoring/grafana/cryofastar.json) matches the daemon's metrics.

Every metric name and every ``stage``/``queue`` label value the dashboard's PromQL uses
must be one the daemon really exports, and every metric the daemon exports must be on
the dashboard (or allowed off it below, with a reason). Renaming a metric in
daemon/metrics.py without updating the dashboard fails here. Fast: no daemon, no network.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
from cryofastar.daemon.metrics import DaemonMetrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parents[1] / "monitoring" / "grafana" / "cryofastar.json"

# Metric families the daemon exports that the dashboard may leave out: name -> reason.
# Empty today: the dashboard shows every metric. Add one here only with a reason.
ALLOWED_UNUSED: dict[str, str] = {}

_METRIC = re.compile(r"cryofastar_[a-z_]+")
_LABEL_MATCHER = re.compile(r'\b(stage|queue)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _daemon_source() -> str:
    """The source of every module of the daemon package (the stage and queue names live there)."""
    spec = importlib.util.find_spec("cryofastar.daemon")
    assert spec is not None and spec.submodule_search_locations
    return "\n".join(p.read_text() for d in spec.submodule_search_locations for p in sorted(Path(d).glob("*.py")))


def _daemon_label_values() -> dict[str, set[str]]:
    """The ``stage`` values the daemon observes latencies for and its ``queue`` names."""
    source = _daemon_source()
    stages = set(re.findall(r'latency\.labels\(\s*"([a-z_]+)"\s*\)', source))
    queues_literal = re.search(r"queues\s*=\s*\{([^}]*)\}", source)
    assert queues_literal is not None, "the queue names of the daemon's status() were not found in daemon/"
    queues = set(re.findall(r'"([a-z_]+)"\s*:', queues_literal.group(1)))
    # the parsing itself is checked: the daemon has had these since the metrics were written
    assert {"read", "pose", "accumulate", "map", "checkpoint"} <= stages, stages
    assert {"files", "chunks", "posed"} <= queues, queues
    return {"stage": stages, "queue": queues}


def _exported() -> tuple[set[str], set[str]]:
    """(sample names, family names) the daemon's registry exposes once every label was used."""
    m = DaemonMetrics()
    labels = _daemon_label_values()
    for stage in labels["stage"]:
        m.latency.labels(stage).observe(0.1)
    for queue in labels["queue"]:
        m.queue_depth.labels(queue).set(1)
    m.set_resolution_angstrom(4.2)
    text = generate_latest(m.registry).decode()
    samples: set[str] = set()
    families: set[str] = set()
    for family in text_string_to_metric_families(text):
        samples.update(s.name for s in family.samples)
        if not family.name.endswith("_created"):
            families.add(family.name)
    assert samples and all(s.startswith("cryofastar_") for s in samples), samples
    return samples, families


def _family_of(sample: str, families: set[str]) -> str | None:
    """The exported family a sample name belongs to (counters: ``x_total``; histograms: ``x_bucket``...)."""
    for suffix in ("", "_total", "_bucket", "_sum", "_count"):
        if suffix and not sample.endswith(suffix):
            continue
        base = sample[: len(sample) - len(suffix)] if suffix else sample
        if base in families:
            return base
    return None


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _queries(dashboard: dict) -> list[str]:
    """Every PromQL text of the dashboard: panel targets and query variables."""
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def _structure_problems(dashboard: dict) -> list[str]:
    """What keeps the JSON from being a well-formed, importable dashboard."""
    problems = []
    if dashboard.get("title") != "cryofastar-stream" or dashboard.get("uid") != "cryofastar-stream":
        problems.append("title and uid must be 'cryofastar-stream'")
    if not isinstance(dashboard.get("schemaVersion"), int):
        problems.append("schemaVersion missing")
    inputs = {(i.get("name"), i.get("pluginId")) for i in dashboard.get("__inputs", [])}
    if ("DS_PROMETHEUS", "prometheus") not in inputs:
        problems.append("no DS_PROMETHEUS input")
    variables = dashboard.get("templating", {}).get("list", [])
    if not any(v.get("type") == "datasource" and v.get("name") == "datasource" and v.get("query") == "prometheus"
               for v in variables):
        problems.append("no 'datasource' variable of Prometheus data sources")
    panels = _panels(dashboard)
    if not panels:
        problems.append("no panels")
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
        problems.append(f"panel ids not unique integers: {ids}")
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        title = p.get("title", "?")
        pos = p.get("gridPos", {})
        if not all(isinstance(pos.get(k), int) for k in "xywh") or pos["x"] + pos["w"] > 24:
            problems.append(f"{title}: bad gridPos {pos}")
            continue
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                if (x, y) in cells:
                    problems.append(f"{title} overlaps {cells[(x, y)]}")
                    break
                cells[(x, y)] = title
            else:
                continue
            break
        if p.get("type") == "row":
            continue
        if "unit" not in p.get("fieldConfig", {}).get("defaults", {}):
            problems.append(f"{title}: no unit")
        targets = p.get("targets", [])
        if not any(t.get("expr") for t in targets):
            problems.append(f"{title}: no target with an expr")
        for ds in [p.get("datasource"), *(t.get("datasource") for t in targets)]:
            if ds != _DATASOURCE:
                problems.append(f"{title}: datasource {ds} is not the $datasource variable")
    for expr in _queries(dashboard):
        for a, b in ("()", "{}", "[]"):
            if expr.count(a) != expr.count(b):
                problems.append(f"unbalanced {a}{b} in {expr!r}")
    return problems


def _metric_problems(dashboard: dict) -> list[str]:
    """Metrics and label values the dashboard uses that the daemon does not export, and the reverse."""
    samples, families = _exported()
    labels = _daemon_label_values()
    problems = []
    used: set[str] = set()
    for expr in _queries(dashboard):
        for name in _METRIC.findall(expr):
            if name not in samples:
                problems.append(f"{name} (in {expr!r}) is not exported by the daemon")
            family = _family_of(name, families)
            if family is not None:
                used.add(family)
        for label, op, value in _LABEL_MATCHER.findall(expr):
            if "$" in value:  # a dashboard variable
                continue
            named = value.split("|") if op in ("=~", "!~") else [value]
            problems += [f'{label}="{v}" (in {expr!r}) is not a {label} of the daemon'
                         for v in named if v not in labels[label]]
    for family in sorted(families - used - set(ALLOWED_UNUSED)):
        problems.append(f"{family} is exported by the daemon but not on the dashboard")
    for family in sorted(set(ALLOWED_UNUSED) - families):
        problems.append(f"ALLOWED_UNUSED names {family}, which the daemon does not export")
    return problems


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return _load(DASHBOARD)


def test_dashboard_is_well_formed(dashboard: dict) -> None:
    assert _structure_problems(dashboard) == []
    assert dashboard["refresh"] == "5s"
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}


def test_dashboard_uses_only_exported_metrics_and_all_of_them(dashboard: dict) -> None:
    assert _metric_problems(dashboard) == []


def test_every_selector_is_scoped_to_one_daemon(dashboard: dict) -> None:
    """Each metric the panels query is filtered by $job and $instance (no mixing of daemons)."""
    for p in _panels(dashboard):
        for t in p.get("targets", []):
            for m in _METRIC.finditer(t["expr"]):
                selector = t["expr"][m.end():].split("}", 1)[0]
                assert t["expr"][m.end():].startswith("{") and 'job="$job"' in selector \
                    and 'instance="$instance"' in selector, (p["title"], t["expr"])


def test_resolution_is_shown_in_angstrom(dashboard: dict) -> None:
    """The daemon exports metres: panels showing it in Å must scale by 1e10."""
    for p in _panels(dashboard):
        for t in p.get("targets", []):
            if "cryofastar_map_resolution_meters" in t["expr"]:
                assert "* 1e10" in t["expr"], t["expr"]
                assert p["fieldConfig"]["defaults"]["unit"] == "suffix:Å", p["title"]


def _rename_metric(d: dict) -> None:
    target = _panels(d)[1]["targets"][0]
    target["expr"] = target["expr"].replace("cryofastar_particles_in_map", "cryofastar_particles_in_the_map")


def _counter_without_total(d: dict) -> None:
    for p in _panels(d):
        for t in p.get("targets", []):
            t["expr"] = t["expr"].replace("cryofastar_batches_total", "cryofastar_batches")


def _drop_queue_panel(d: dict) -> None:
    d["panels"] = [p for p in d["panels"] if "cryofastar_queue_depth" not in json.dumps(p.get("targets", []))]


def _unknown_stage(d: dict) -> None:
    t = _panels(d)[1]["targets"][0]
    t["expr"] = t["expr"].replace('job="$job"', 'stage="posing", job="$job"')


def _unknown_queue(d: dict) -> None:
    t = _panels(d)[1]["targets"][0]
    t["expr"] = t["expr"].replace('job="$job"', 'queue=~"files|reads", job="$job"')


def _overlap(d: dict) -> None:
    _panels(d)[2]["gridPos"] = dict(_panels(d)[1]["gridPos"])


def _duplicate_id(d: dict) -> None:
    _panels(d)[2]["id"] = _panels(d)[1]["id"]


def _no_expr(d: dict) -> None:
    _panels(d)[1]["targets"] = []


@pytest.mark.parametrize(("break_it", "check", "expected"), [
    (_rename_metric, _metric_problems, "cryofastar_particles_in_the_map"),
    (_counter_without_total, _metric_problems, "cryofastar_batches (in"),
    (_drop_queue_panel, _metric_problems, "cryofastar_queue_depth is exported"),
    (_unknown_stage, _metric_problems, 'stage="posing"'),
    (_unknown_queue, _metric_problems, 'queue="reads"'),
    (_overlap, _structure_problems, "overlaps"),
    (_duplicate_id, _structure_problems, "ids not unique"),
    (_no_expr, _structure_problems, "no target with an expr"),
])
def test_checks_catch_a_broken_copy(dashboard: dict, tmp_path: Path, break_it, check, expected: str) -> None:
    """The checks above are not vacuous: a broken copy of the dashboard fails them."""
    broken = copy.deepcopy(dashboard)
    break_it(broken)
    path = tmp_path / "cryofastar.json"
    path.write_text(json.dumps(broken), encoding="utf-8")
    problems = check(_load(path))
    assert any(expected in p for p in problems), problems
