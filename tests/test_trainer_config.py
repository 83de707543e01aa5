"""How a task's config becomes objects: init_instance_by_config and placeholders."""

from __future__ import annotations

import pytest

from qcelery.errors import ConfigError, TaskTypeError
from qcelery.instance import fill_placeholder, flatten_dict, init_instance_by_config
from qcelery.models import LinearModel
from qcelery.records import SignalRecord


def test_class_module_path_kwargs_dotted_path_class_object_and_instance():
    m = init_instance_by_config(
        {"class": "LinearModel", "module_path": "qcelery.models", "kwargs": {"alpha": 2.0}, "name": "ignored extra key"}
    )
    assert isinstance(m, LinearModel) and m.alpha == 2.0
    assert init_instance_by_config({"class": "qcelery.models.LinearModel"}).alpha == 1.0
    assert init_instance_by_config({"class": LinearModel, "kwargs": {"alpha": 3.0}}).alpha == 3.0
    assert init_instance_by_config(LinearModel).alpha == 1.0
    assert init_instance_by_config(m, accept_types=LinearModel) is m
    assert isinstance(init_instance_by_config("SignalRecord", default_module="qcelery.records"), SignalRecord)


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"class": "NoSuchModel", "module_path": "qcelery.models"},
            r"module 'qcelery.models' has no class 'NoSuchModel' \(it offers: .*LinearModel",
        ),
        (
            {"class": "Ridge", "module_path": "no_such_pkg.models"},
            "cannot import module 'no_such_pkg.models' for class 'Ridge': ModuleNotFoundError",
        ),
        ({"class": "LinearModel"}, "class 'LinearModel' has no module"),
        (
            {"class": "LinearModel", "module_path": "qcelery.models", "kwargs": {"alpah": 1}},
            r"qcelery.models.linear.LinearModel: bad kwargs \['alpah'\]",
        ),
        ({"class": "LinearModel", "module_path": "qcelery.models", "kwargs": [1]}, "'kwargs' of 'LinearModel' must be a mapping"),
        ({"module_path": "qcelery.models"}, "has no 'class'"),
    ],
)
def test_import_failures_name_the_module_or_class(config, message):
    with pytest.raises(ConfigError, match=message):
        init_instance_by_config(config)


def test_wrong_type_of_config():
    with pytest.raises(TaskTypeError, match="expected a config dict or an instance of LinearModel"):
        init_instance_by_config(42, accept_types=LinearModel)


def test_try_kwargs_are_passed_only_where_accepted_and_the_config_wins():
    rec = init_instance_by_config(
        {"class": "SignalRecord", "module_path": "qcelery.records", "kwargs": {"model": "mine"}},
        try_kwargs={"model": "tried", "dataset": "ds", "unrelated": 1},
    )
    assert (rec.model, rec.dataset) == ("mine", "ds")


def test_fill_placeholder_fills_objects_and_paths_and_leaves_the_input_alone():
    model = object()
    config = {
        "record": [{"kwargs": {"model": "<MODEL>", "start": "<dataset.segments.test.0>", "other": "<nope>"}}],
        "dataset": {"segments": {"test": ["2020-01-02", "2020-12-31"]}},
    }
    filled = fill_placeholder(config, {"<MODEL>": model})
    kwargs = filled["record"][0]["kwargs"]
    assert kwargs["model"] is model and kwargs["start"] == "2020-01-02" and kwargs["other"] == "<nope>"
    assert config["record"][0]["kwargs"]["model"] == "<MODEL>"
    with pytest.raises(ConfigError, match="must look like '<NAME>'"):
        fill_placeholder(config, {"MODEL": model})


def test_flatten_dict_as_logged_params():
    assert flatten_dict({"a": 1, "c": {"a": 2, "b": {"x": 5}}, "d": [1, 2]}) == {"a": 1, "c.a": 2, "c.b.x": 5, "d": [1, 2]}
