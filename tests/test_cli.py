"""Local CLI commands: registering base models, with clear errors for bad input."""

from pathlib import Path

from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_models_add_and_list(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    added = runner.invoke(app, ["models", "add", "tiny", str(tiny_model_dir), *data])
    assert added.exit_code == 0, added.output
    listed = runner.invoke(app, ["models", "list", *data])
    assert listed.output.strip() == f"tiny\t{tiny_model_dir.resolve()}"


def test_models_add_refuses_bad_input(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    not_a_model = runner.invoke(app, ["models", "add", "x", str(tmp_path), *data])
    assert not_a_model.exit_code == 2 and "config.json" in not_a_model.output
    bad_name = runner.invoke(app, ["models", "add", "a:b", str(tiny_model_dir), *data])
    assert bad_name.exit_code == 2 and "invalid model name" in bad_name.output


def test_models_pull_unknown_name(tmp_path: Path) -> None:
    result = runner.invoke(app, ["models", "pull", "no-such-model", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "smollm2-135m-instruct" in result.output


def test_keys_create_list_and_revoke(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    created = runner.invoke(app, ["keys", "create", "--org", "acme", "--name", "ci", *data])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()  # the key alone on stdout, for KEY=$(ftjobs keys create ...)
    assert key.startswith("sk-ftj-") and "\n" not in key
    key_id = key.removeprefix("sk-ftj-").split("-")[0]
    listed = runner.invoke(app, ["keys", "list", "--org", "acme", *data]).stdout
    assert listed.startswith(f"{key_id}\tacme\tci\tsk-ftj-") and key not in listed
    assert runner.invoke(app, ["keys", "revoke", key_id, *data]).exit_code == 0
    revoked = runner.invoke(app, ["keys", "list", *data]).stdout.split("\t")
    assert revoked[-1].strip() != "-"  # revoked_at
    admin = runner.invoke(app, ["keys", "create", "--admin", *data]).stdout.strip()
    assert admin.startswith("sk-ftjadmin-")
    for bad in (["keys", "create", *data], ["keys", "create", "--org", "Bad Name", *data]):
        assert runner.invoke(app, bad).exit_code == 2
    assert runner.invoke(app, ["keys", "revoke", "nope", *data]).exit_code == 2
