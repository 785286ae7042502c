def test_compare_models_answers_from_every_alias(eco):
    """fiedler.compare_models: one entry per model alias, each with its answer."""
    aliases = [m["alias"] for m in eco.call("fiedler.list_models")]
    results = eco.call("fiedler.compare_models", prompt="name a colour", max_tokens=16)
    assert [r["model"] for r in results] == aliases
    assert all(r["ok"] and r["text"] and r["total_tokens"] > 0 for r in results)


def test_compare_models_reports_an_unknown_alias_without_failing_the_rest(eco):
    results = eco.call("fiedler.compare_models", prompt="hi", models=["default", "no-such-model"])
    assert [r["ok"] for r in results] == [True, False]
    assert "no-such-model" in results[1]["error"]
