"""Run reports a person reads: one plot panel per unit kind, log axes only for wide ranges, titles and units;
the provenance block of report.json; the EPR statement; progress bars with the real number of rounds,
forced on by --progress when stderr is no terminal and off with --quiet."""

import json

import pytest
import torch

from spectra_gpu import _progress, driver, report
from spectra_gpu.driver import PruneConfig, prune
from spectra_gpu.finetune import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # exact comparisons of runs, on one thread


def _mixed_report():
    names = {"l0.ffn": "ffn", "l1.ffn": "ffn", "l0.attn": "head", "l1.attn": "head"}
    q = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    return {
        "model": "toy", "scorer": "spectral", "target": 0.2, "epr": 0.21, "epr_basis": "total", "params_before": 100,
        "params_after": 79, "metric_name": "perplexity", "higher_is_better": False, "metric_before": 10.0,
        "metric_after_prune": 11.0, "metric_after_finetune": 10.5, "seconds_scoring": 1.0, "seconds_total": 2.0,
        "rounds": [{"round": 1, "epr": 0.21, "metric": 11.0, "removed": {}, "params": 79, "seconds_scoring": 1.0}],
        "kinds_by_group": names, "widths_before": {"l0.ffn": 64, "l1.ffn": 64, "l0.attn": 4, "l1.attn": 4},
        "widths_after": {"l0.ffn": 48, "l1.ffn": 48, "l0.attn": 3, "l1.attn": 3},
        "score_distributions": {g: {"n": 4, "dead": 0, "quantiles": q} for g in names},
        "eigenvalues": {"l0.ffn": [1e4, 10.0, 1.0], "l1.ffn": [5e3, 8.0, 0.5], "l0.attn": [2.0, 1.5, 1.2],
                        "l1.attn": [2.2, 1.4, 1.1]},
    }


def _figures(monkeypatch, rep, tmp_path):
    figs = {}

    def keep(fig, path):
        figs[path.name] = fig

    monkeypatch.setattr(report, "_save_fig", keep)
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    made = report.plot_all(rep, tmp_path)
    return made, figs


def test_each_unit_kind_gets_its_own_panel_with_units_and_fitting_scales(monkeypatch, tmp_path):
    made, figs = _figures(monkeypatch, _mixed_report(), tmp_path)
    assert set(made) == {"scores", "eigen", "metric", "widths"}
    for name in (report.PLOTS["scores"], report.PLOTS["widths"], report.PLOTS["eigen"]):
        axes = figs[name].axes
        assert len(axes) == 2, name  # FFN neurons and heads never share an axis
        titles = [ax.get_title() for ax in axes]
        assert any(t.startswith("FFN neurons") for t in titles) and any(t.startswith("attention heads") for t in titles)
    for ax in figs[report.PLOTS["widths"]].axes:
        labels = {t.get_text() for t in ax.get_xticklabels()}
        assert labels in ({"l0.ffn", "l1.ffn"}, {"l0.attn", "l1.attn"})
        assert ax.get_ylabel() in ("FFN neurons", "attention heads")
    scales = {ax.get_title().split(":")[0]: ax.get_yscale() for ax in figs[report.PLOTS["eigen"]].axes}
    assert scales == {"FFN neurons": "log", "attention heads": "linear"}  # 4 decades vs a factor of 2
    metric = figs[report.PLOTS["metric"]].axes[0]
    assert metric.get_yscale() == "linear" and "lower is better" in metric.get_ylabel()
    assert "total basis" in metric.get_xlabel()


def test_wide_range():
    assert report.wide_range([1.0, 1e3]) and not report.wide_range([1.0, 50.0])
    assert not report.wide_range([-1.0, 1e3])  # a log axis cannot show it


def test_epr_statement_says_where_the_epr_landed():
    free = report.epr_statement(0.1, 0.1002, "total", False, 1)
    assert "0.1002" in free and "target of 0.1" in free and "per-layer widths" in free
    below = report.epr_statement(0.1, 0.0971, "total", True, 8)
    assert "nearest the target" in below and "0.0029 below" in below and "multiples of 8" in below


def test_provenance_records_versions_commit_device_threads_time_and_command():
    env = report.provenance(device="cpu", command="spectra prune --model x")
    assert env["versions"]["spectra_gpu"] and env["versions"]["torch"] and "numpy" in env["versions"]
    assert env["device"] == "cpu" and env["threads"]["torch"] == torch.get_num_threads()
    assert env["timestamp_utc"].endswith("+00:00") and env["command"] == "spectra prune --model x"
    assert env["git"] is None or len(env["git"]["commit"]) == 40
    assert env["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu"]["model"] is None or env["cpu"]["model"].strip() == env["cpu"]["model"] != ""
    json.dumps(env)  # JSON-able


def test_progress_bar_total_is_the_real_number_of_rounds(monkeypatch):
    from test_driver import mlp_setup

    bars = []

    class Recording(_progress.Bar):
        def __init__(self, total, desc, unit="it"):
            super().__init__(total, desc, unit)
            self.first_total = total
            bars.append(self)

    monkeypatch.setattr(driver, "Bar", Recording)
    model, kw, calib = mlp_setup()
    cfg = PruneConfig(target=0.4, kinds=("neuron",), round_fraction=0.1, scorer="l1",
                      finetune=FinetuneConfig(epochs=0))
    res = prune(model, calib, cfg, **kw)
    n = len(res.report["rounds"])
    assert n >= 3 and len(bars) == 1
    assert bars[0].first_total == n  # planned before the first round, from the widths alone
    assert bars[0].total == n and bars[0].n == n


def test_cli_progress_flag_forces_bars_and_quiet_silences_them(tmp_path, capsys, monkeypatch):
    from spectra_gpu.cli import main

    monkeypatch.setenv("SPECTRA_GPU_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPECTRA_GPU_PROGRESS", "0")  # and stderr is not a terminal here
    argv = ["prune", "--model", "digits-mlp", "--target", "0.1", "--scorer", "l1", "--epochs", "0",
            "--round-fraction", "0.1"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "pruning (l1) to EPR 0.1" in err
    assert main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "parameters:" in captured.out
    assert not _progress.enabled()  # forced only for the command's duration
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    assert rep["environment"]["command"] == "spectra " + " ".join([*argv, "--out", str(tmp_path / "b"), "--quiet"])
    cpu = rep["environment"]["cpu"]
    assert f"CPU {cpu['model'] or 'unknown'} (torch kernels {cpu['capability']})" in \
        (tmp_path / "b" / "report.md").read_text()
    assert rep["uniform_widths"] is False  # a plain model keeps free widths
    assert "load_pruned" in rep["saved_model"]["loader"]


@pytest.mark.parametrize("content,what", [('{"model": "digits-mlp", "epr": 0.3', "not valid JSON"),
                                          ("", "not valid JSON"), ("[1, 2]", "expected a JSON object, got a JSON list"),
                                          (b"\xff\xfe{}", "not UTF-8")])
def test_a_damaged_report_json_gives_one_line_naming_the_file_the_damage_and_the_way_out(tmp_path, content, what):
    p = tmp_path / "report.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        report.load_report(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "damaged" in msg and what in msg
    assert "delete it and rerun the run without --resume" in msg
    with pytest.raises(ValueError, match="damaged"):
        report.render(tmp_path)


def test_load_report_names_a_missing_directory_or_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        report.load_report(tmp_path / "nowhere")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        report.load_report(tmp_path / "f")
    with pytest.raises(ValueError, match="holding report.json, got .*, which has none"):
        report.load_report(tmp_path)
