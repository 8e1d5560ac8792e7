"""Helpers the CLI tests import."""

import json


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, as strict parsers (browsers, jq, Go, Rust) do: RFC 8259 has neither."""

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON (RFC 8259); strict parsers refuse it")

    return json.loads(text, parse_constant=refuse)
