"""The configuration reference in docs/ is the schema's, generated: it is current, and every field is described."""

from pydantic import BaseModel

from rlhf_pipeline.stages.core import config_reference
from rlhf_pipeline.stages.core.config import PipelineConfig
from tests.conftest import REPO


def test_the_committed_reference_is_the_one_the_schema_generates():
    committed = (REPO / "docs" / "configuration-reference.md").read_text()
    assert committed == config_reference.render(), "stale: run `make docs` and commit docs/configuration-reference.md"


def test_every_field_of_the_schema_has_a_description():
    undescribed = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if not field.description:
                undescribed.append(f"{prefix}{name}")
            section = config_reference.section_of(field.annotation)
            if section is not None:
                walk(section, f"{prefix}{name}.")

    walk(PipelineConfig, "")
    assert undescribed == []
