"""run_generate's SGLang meta record: the routed scaling factor inside the weights, from the payload."""

import json

import jsonschema
import pytest

from moe_routes.generate import kernel_scaling_factor
from moe_routes.schema import load_schema

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("included, factor, want", [(True, 2.5, 2.5), (False, 2.5, 1.0), (None, 2.5, None)])
def test_kernel_scaling_factor_follows_the_payload(included, factor, want):
    decoded = {"weights_include_routed_scaling_factor": included, "routed_scaling_factor": factor}
    assert kernel_scaling_factor(decoded) == want


@pytest.mark.parametrize("value, valid", [(1.0, True), (None, True), ("1.0", False)])
def test_schema_allows_an_unknown_kernel_factor(value, valid):
    schema = load_schema()
    meta_props = schema["$defs"]["meta"]["properties"]["kernel_routed_scaling_factor"]
    validator = jsonschema.Draft202012Validator(meta_props)
    assert validator.is_valid(json.loads(json.dumps(value))) is valid
