"""Config checking with errors a person can act on: the key, what was found, what is allowed."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml


class ConfigError(ValueError):
    """The config does not match config/schema.yaml."""


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        return f"config: {key}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
    if error.validator == "enum":
        return f"config: {key}: {error.instance!r} is not allowed; allowed values: {', '.join(map(repr, error.validator_value))}"
    return f"config: {key}: {error.message}"


def check(config: dict, schema_path: str | Path) -> None:
    """Raise ConfigError listing every problem in config, one line each."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("\n".join(_describe(e) for e in errors))


def with_defaults(schema: dict, config: dict) -> dict:
    """config with every missing key that has a schema default filled in, at any depth."""
    out = dict(config)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = sub["default"]
        if isinstance(out.get(key), dict) and sub.get("type") == "object":
            out[key] = with_defaults(sub, out[key])
    return out


def load(path: str | Path, schema_path: str | Path = Path(__file__).parent.parent / "config" / "schema.yaml") -> dict:
    """A config file, checked and completed with the schema's defaults (for tools run outside Snakemake)."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    check(config, schema_path)
    return with_defaults(yaml.safe_load(Path(schema_path).read_text()), config)
