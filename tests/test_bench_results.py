"""bench.results.write: a run replaces only its own machine's runs; the other benches'
subsections of that machine, other machines and the history stay."""

from __future__ import annotations

import pytest

from bench import results


def _run(when: str) -> dict:
    return {"when": when, "command": "python -m bench", "info": {"CPU": "A"}, "threads": []}


def test_a_run_keeps_the_other_benches_subsections(tmp_path):
    path = tmp_path / "RESULTS.md"
    key = "CPU A, 2 logical cores; torch x"
    path.write_text("\n".join([
        "# intro", "", f"## Machine: {key}", "",
        results.PRECISION, "", "precision figures", "",
        results.PRECISION_OWN, "", "own CPU time figures", "",
        "### Run of first", "", "old run", "",
        "## Machine: CPU B; torch y", "", "### Run of b", "", "b's run", "",
        "## History", "", "history text", ""]))
    results.write(path, key, _run("second"))
    text = path.read_text()
    for kept in ("precision figures", "own CPU time figures", "b's run", "history text",
                 "### Run of second", "old run"):
        assert kept in text, kept
    assert text.index("### Run of second") < text.index("### Run of first")


def test_a_gpu_run_names_its_device_and_runs_both_sides_there():
    """Rows measured on a GPU say so; end to end, the plain script and varprobe both run
    on that device (torch's sums only: numba's are the CPU's)."""
    from bench import e2e

    row = {"model": "GPT", "device": "cuda", "layers": 1, "sides": {}, "mem_ratio": 1.0,
           "mem_bare_mb": 1.0, "mem_probe_mb": 1.0, "transfers": 1}
    assert results.where(row) == "GPT (cuda)"
    assert results.where({**row, "device": "cpu"}) == "GPT"
    assert "| cuda GPT |" in "\n".join(results.memory_table([row]))
    commands = e2e.commands(numba=True, device="cuda")
    assert set(commands) == {"plain script", "varprobe analyze", "varprobe check"}
    assert commands["plain script"][0][-1] == "cuda"
    assert all(argv[-2:] == ["--device", "cuda"] for name, (argv, _) in commands.items()
               if name != "plain script")
    assert "varprobe analyze, numba sums" in e2e.commands(numba=True, device="cpu")


def test_the_reads_floor_reads_each_tensor_once():
    """bench.peers.reads: a sum and a norm of every leaf output, output gradient,
    parameter and parameter gradient (not the input's gradient), nothing else."""
    import torch
    from torch import nn

    from bench import overhead, peers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, g = torch.randn(5, 4), torch.randn(5, 3)
    got = peers.reads(model, x, g, overhead.bare)
    assert len(got) == 2 * (3 + 3 + 4 + 4)
    first = model[0](x).detach().double()
    assert got[0] == pytest.approx(first.sum().item(), abs=1e-5)
    assert got[1] == pytest.approx(first.norm().item(), rel=1e-6)
    assert got[2] == pytest.approx(model[0].weight.double().sum().item(), abs=1e-5)
