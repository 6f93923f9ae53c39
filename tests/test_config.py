import re

import jsonschema
import pytest
import yaml
from conftest import REPO
from pydantic import BaseModel

from workflow.config import Config, ConfigError, check, schema_text
from workflow.schemes import BASELINE, SCHEMES

CONFIG = REPO / "config" / "config.yaml"
SCHEMA = REPO / "config" / "schema.yaml"


def default_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def keys(model: type[BaseModel], prefix: str = ""):
    """Every declared key, depth first: (dotted path, field)."""
    for name, field in model.model_fields.items():
        yield prefix + name, field
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from keys(field.annotation, f"{prefix}{name}.")


def commented_keys(text: str) -> dict[str, bool]:
    """Each key written in a YAML file: its dotted path, and whether its line carries a comment."""
    found, stack = {}, []
    for line in text.splitlines():
        match = re.match(r"^( *)([A-Za-z0-9_]+):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        found[".".join(k for _, k in stack)] = "#" in rest
    return found


def test_default_config_is_valid():
    check(default_config())


def test_every_key_has_a_description_and_a_default():
    for path, field in keys(Config):
        assert field.description, f"{path} has no description (a docstring under its declaration)"
        assert not field.is_required(), f"{path} has no default"


def test_the_checked_in_schema_is_generated_from_the_models():
    assert SCHEMA.read_text() == schema_text(), "config/schema.yaml is stale: run `make schema`"


def test_the_schema_agrees_with_the_models():
    """External validators (editors, CI linters) reading config/schema.yaml accept the default and refuse a typo."""
    validator = jsonschema.Draft202012Validator(yaml.safe_load(SCHEMA.read_text()))
    assert not list(validator.iter_errors(default_config()))
    assert list(validator.iter_errors(default_config() | {"finetune": {"zero_stag": 3}}))


def test_config_yaml_writes_out_and_comments_every_key():
    written = commented_keys(CONFIG.read_text())
    for path, _ in keys(Config):
        assert path in written, f"config/config.yaml does not show {path}"
        assert written[path], f"config/config.yaml: {path} has no comment"


def test_wrong_value_names_key_and_allowed_values():
    config = default_config()
    config["finetune"]["zero_stage"] = 4
    with pytest.raises(ConfigError, match=r"config: finetune.zero_stage: 4 is not allowed; allowed values: 0, 1, 2, 3"):
        check(config)


def test_unknown_key_names_key_and_allowed_keys():
    config = default_config()
    config["finetune"]["zero_stag"] = 3
    with pytest.raises(ConfigError) as err:
        check(config)
    assert "config: finetune: unknown key(s) 'zero_stag'; allowed:" in str(err.value)
    assert "zero_stage" in str(err.value)


def test_every_problem_is_reported():
    config = default_config()
    config["data"]["on_bad_row"] = "ignore"
    config["finetune"]["learning_rate"] = -1
    config["quantize"]["schemes"] = [BASELINE, "int3"]
    config["bootstrap"]["num_heads"] = 3
    config["rollout"]["gateway"]["audit"]["log_text"] = "yes"
    with pytest.raises(ConfigError) as err:
        check(config)
    lines = str(err.value).splitlines()
    assert "config: data.on_bad_row: 'ignore' is not allowed; allowed values: 'fail', 'skip'" in lines
    assert "config: finetune.learning_rate: Input should be greater than 0 (got -1)" in lines
    assert f"config: quantize.schemes.1: 'int3' is not allowed; allowed values: {', '.join(map(repr, SCHEMES))}" in lines
    assert any(line.startswith("config: bootstrap: hidden_size (128) must divide by num_heads (3)") for line in lines)
    assert "config: rollout.gateway.audit.log_text: Input should be a valid boolean (got 'yes')" in lines


def test_defaults_fill_what_a_config_leaves_out():
    filled = check({"finetune": {"method": "lora", "lora": {"r": 8}}})
    assert filled["finetune"]["lora"] == {**filled["finetune"]["lora"], "r": 8, "alpha": 32}
    assert filled["quantize"]["max_accuracy_loss"] == {name: s.max_accuracy_loss for name, s in SCHEMES.items()}
    assert filled["data"]["path"] == "generated"


@pytest.mark.e2e
def test_snakemake_refuses_bad_config_before_running(tmp_path, snakemake):
    done = snakemake(tmp_path, {"finetune": {"method": "qlora"}}, "-n", check=False)
    assert done.returncode != 0
    assert "config: finetune.method: 'qlora' is not allowed; allowed values: 'full', 'lora'" in done.stderr + done.stdout
    assert not (tmp_path / "results").exists()
