import mlflow
from mlflow.tracking import MlflowClient

from workflow.tracking import flatten, job_run, pipeline_run_id, redact, sha256_tree


def test_secrets_are_never_params():
    params = {"kms": {"api_key": "s3cr3t", "key_file": "/k", "vault_token": "t", "url": "u"}, "evaluate": {"max_new_tokens": 9}}
    assert redact(params) == {"kms": {"url": "u"}, "evaluate": {"max_new_tokens": 9}}
    assert flatten(redact(params)) == {"kms.url": "u", "evaluate.max_new_tokens": "9"}


def test_jobs_share_one_parent_per_results_dir_and_failures_show(tracking, tmp_path):
    log = tmp_path / "job.log"
    log.write_text("hello from the job\n")
    tracking = tracking.__class__(**{**tracking.__dict__, "log_path": str(log)})
    with job_run(tracking, "prepare_data", {"data": {"seed": 1}}):
        mlflow.log_metric("rows", 3)
    try:
        with job_run(tracking, "quantize/fp8", {}):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    parent = pipeline_run_id(tracking)
    client = MlflowClient()
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"prepare_data", "quantize/fp8"}
    assert by_name["quantize/fp8"].info.status == "FAILED" and by_name["quantize/fp8"].data.tags["ft2prod.scheme"] == "fp8"
    assert client.get_run(parent).info.status == "FAILED"
    assert {a.path for a in client.list_artifacts(by_name["prepare_data"].info.run_id)} == {"config.json", "job.log"}
    assert {a.path for a in client.list_artifacts(by_name["quantize/fp8"].info.run_id)} == {"job.log"}


def test_tree_digest_changes_with_any_byte(tmp_path):
    (tmp_path / "a").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_text("y")
    first, files = sha256_tree(tmp_path)
    assert set(files) == {"a", "sub/b"}
    (tmp_path / "sub" / "b").write_text("z")
    assert sha256_tree(tmp_path)[0] != first
