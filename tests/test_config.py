"""The pipeline file: a good one loads; every bad one is a clear message, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from generator.config import Pipeline, SeniorModel, load_pipeline
from generator.errors import SpecError, UserError

REPO = Path(__file__).resolve().parents[1]
GOOD = 'name = "offline"\n\n[senior]\nmodel = "offline/reference"\n'


def pipeline_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(UserError) as caught:
        load_pipeline(path)
    message = str(caught.value)
    assert "Traceback" not in message and "pydantic" not in message.lower()
    return message


def lines_of(path: Path) -> list[str]:
    return error_of(path).splitlines()


# --- good files ------------------------------------------------------------------------


def test_the_shipped_pipelines_load() -> None:
    for path in sorted((REPO / "pipelines").glob("*.toml")):
        assert isinstance(load_pipeline(path), Pipeline)


def test_a_small_pipeline_loads_with_defaults(tmp_path: Path) -> None:
    pipeline = load_pipeline(pipeline_file(tmp_path, GOOD))
    assert pipeline.senior.is_offline and pipeline.senior.model == "offline/reference"
    assert pipeline.concurrency == 4


def test_online_models_are_not_checked_against_the_offline_list(tmp_path: Path) -> None:
    text = GOOD.replace("offline/reference", "openai/gpt-4o") + 'fallbacks = ["offline/reference"]\n'
    assert load_pipeline(pipeline_file(tmp_path, text)).senior.fallbacks == ["offline/reference"]


# --- files that cannot be read ---------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert "pipeline file not found" in error_of(tmp_path / "nope.toml")


def test_a_folder_is_not_a_pipeline_file(tmp_path: Path) -> None:
    folder = tmp_path / "pipeline.toml"
    folder.mkdir()
    assert error_of(folder) == f"{folder}: is a folder, not a pipeline file; pass a .toml file such as " \
                               "pipelines/offline.toml"


def test_an_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = pipeline_file(tmp_path, GOOD)

    def denied(self: Path, *args: object, **kwargs: object) -> str:  # chmod 0 binds nobody when root
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    assert error_of(path) == f"{path}: cannot read the pipeline file: Permission denied"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    assert error_of(path) == f"{path}: not valid UTF-8 at byte 11; expected a TOML file saved as UTF-8"


def test_toml_syntax_error_keeps_line_and_column(tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, GOOD + "temperature = \n")
    message = error_of(path)
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "(at line 5, column 15)" in message


# --- files that do not validate -------------------------------------------------------


def test_unknown_key_is_named_with_its_table_and_a_suggestion(tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, GOOD + "temprature = 0.5\n")
    [line] = lines_of(path)
    assert line.startswith(f"{path}: unknown key 'temprature' in [senior]; expected one of: model, fallbacks, ")
    assert line.endswith("did you mean 'temperature'?")


def test_wrong_types_say_what_was_expected(tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, GOOD + 'max_tokens = "lots"\nfallbacks = ["a", 3]\n'
                         '[sandbox]\nrequire = "docker"\ntimeout_seconds = 0\n')
    assert lines_of(path) == [
        f"{path}: 'sandbox.require' must be one of 'bubblewrap', 'unshare' or 'none', got 'docker'",
        f"{path}: 'sandbox.timeout_seconds' must be more than 0, got the number 0",
        f"{path}: 'senior.fallbacks[1]' must be a string, got the number 3; quote it to make it text",
        f"{path}: 'senior.max_tokens' must be a whole number, got 'lots'",
    ]


def test_missing_keys_are_named_with_their_table(tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, '[senior]\ntemperature = 0.0\n[prices."local/x"]\ninput_per_mtok = 1\n')
    assert lines_of(path) == [
        f"{path}: missing required key 'model' in [senior]",
        f"{path}: missing required key 'name' in the pipeline file",
        f"{path}: missing required key 'output_per_mtok' in [prices.local/x]",
    ]


def test_validation_errors_are_a_user_error_listing_every_problem(tmp_path: Path) -> None:
    path = pipeline_file(tmp_path, '[senior]\nmodel = 5\n')
    with pytest.raises(SpecError) as caught:
        load_pipeline(path)
    assert [p.file for p in caught.value.problems] == [str(path), str(path)]


@pytest.mark.parametrize("field", ["model", "fallbacks"])
def test_unknown_offline_model_is_refused(tmp_path: Path, field: str) -> None:
    value = '"offline/nope"' if field == "model" else '["offline/nope"]'
    text = GOOD if field == "fallbacks" else GOOD.replace('model = "offline/reference"\n', "")
    path = pipeline_file(tmp_path, text + f"{field} = {value}\n")
    [line] = lines_of(path)
    assert line == (f"{path}: 'senior.{field}': unknown offline model 'offline/nope'; "
                    "the only offline model is 'offline/reference'")


def test_senior_model_refuses_unknown_offline_models_outside_files_too() -> None:
    with pytest.raises(ValueError, match="the only offline model is 'offline/reference'"):
        SeniorModel(model="offline/nope")
    assert SeniorModel(model="offline/reference").is_offline
