import pytest
import yaml

from conftest import REPO, snakemake
from workflow.config import ConfigError, check

SCHEMA = REPO / "config" / "schema.yaml"


def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_is_valid():
    check(default_config(), SCHEMA)


def test_every_schema_key_has_a_description_and_default():
    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            assert "description" in sub, f"{path}{key} has no description"
            assert "default" in sub, f"{path}{key} has no default"
            walk(sub, f"{path}{key}.")

    walk(yaml.safe_load(SCHEMA.read_text()), "")


def test_wrong_value_names_key_and_allowed_values():
    config = default_config()
    config["finetune"]["zero_stage"] = 4
    with pytest.raises(ConfigError, match=r"config: finetune.zero_stage: 4 is not allowed; allowed values: 0, 1, 2, 3"):
        check(config, SCHEMA)


def test_unknown_key_names_key_and_allowed_keys():
    config = default_config()
    config["finetune"]["zero_stag"] = 3
    with pytest.raises(ConfigError) as err:
        check(config, SCHEMA)
    assert "config: finetune: unknown key(s) 'zero_stag'; allowed:" in str(err.value)
    assert "zero_stage" in str(err.value)


def test_every_problem_is_reported():
    config = default_config()
    config["data"]["on_bad_row"] = "ignore"
    config["finetune"]["learning_rate"] = -1
    with pytest.raises(ConfigError) as err:
        check(config, SCHEMA)
    lines = str(err.value).splitlines()
    assert any(line.startswith("config: data.on_bad_row: 'ignore' is not allowed; allowed values: 'fail', 'skip'") for line in lines)
    assert any(line.startswith("config: finetune.learning_rate:") for line in lines)


def test_snakemake_refuses_bad_config_before_running(tmp_path):
    done = snakemake(tmp_path, {"finetune": {"method": "qlora"}}, "-n", check=False)
    assert done.returncode != 0
    assert "config: finetune.method: 'qlora' is not allowed; allowed values: 'full', 'lora'" in done.stderr + done.stdout
    assert not (tmp_path / "results").exists()
