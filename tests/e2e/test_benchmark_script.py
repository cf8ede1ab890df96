"""benchmarks/samplers.py writes the JSON schema the docs promise (a tiny run, not a timing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_samplers", ROOT / "benchmarks" / "samplers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_schema_and_convergence(monkeypatch):
    bench = _load()
    monkeypatch.setattr(bench, "NFES", [5, 50])
    report = bench.run(n=300, projections=16)
    rows = report["results"]
    assert {r["sampler"] for r in rows} == set(bench.SAMPLERS)
    for r in rows:
        assert isinstance(r["sampler"], str) and isinstance(r["nfe"], int) and isinstance(r["sw2"], float)
        assert r["nfe"] <= r["nfe_budget"]
        assert (r["ode_error"] is None) == bench.SAMPLERS[r["sampler"]].stochastic
    by = {(r["sampler"], r["nfe_budget"]): r for r in rows}
    for name in ("euler", "dpmpp_2m", "unipc"):  # more calls, closer to the ODE's solution
        assert by[(name, 50)]["ode_error"] < by[(name, 5)]["ode_error"]
    assert "| sampler |" in bench.markdown(report, "cmd")
