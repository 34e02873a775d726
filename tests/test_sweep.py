"""sweep.py: a grid of real train.py processes as child runs of one MLflow parent run, compared at the end."""

import mlflow
import pytest

import sweep
from conftest import fresh_store


@pytest.mark.full
def test_sweep_runs_children_under_one_parent_and_names_the_best(folder_dir, tmp_path, monkeypatch, capsys,
                                                                 mlflow_tables):
    uri = fresh_store(mlflow_tables, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(tmp_path)
    code = sweep.main(["--lr-scales", "0.5,1", "--widths", "8-16-16", "--augment", "off", "--epochs", "1",
                       "--limit", "0", "--experiment", "sweep-test", "--dataset", "folder", "--data-dir", str(folder_dir),
                       "--batch-size", "16", "--precision", "fp32", "--workers", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.info.run_name.startswith("sweep-")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.params["widths"] for c in children} == {"(8, 16, 16)"} and {c.data.params["flip"] for c in children} == {"none"}
    lrs = sorted(float(c.data.params["lr"]) for c in children)
    assert lrs[1] == pytest.approx(2 * lrs[0])
    best = parent.data.tags["best_run_id"]
    assert best in {c.info.run_id for c in children}
    assert f"/#/experiments/{experiment.experiment_id}/runs/{best}" in out
    assert "comparison.txt" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert not any("registered_model" in c.data.tags for c in children)  # a sweep does not touch the registry
    assert not (tmp_path / "models").exists()


def test_sweep_flag_errors_name_the_flag(capsys):
    for argv, flag in ((["--widths", "huge"], "--widths"), (["--augment", "maybe"], "--augment"),
                       (["--lr-scales", "x"], "--lr-scales"), (["--no-mlflow"], "--no-mlflow"),
                       (["--arch", "tf_efficientnet_lite0"], "--widths"), (["--preset", "baseline"], "--widths")):
        with pytest.raises(SystemExit) as exc:
            sweep.main(argv)
        assert exc.value.code == 2 and flag in capsys.readouterr().err
