"""One allow-list decides what task data may name (DESIGN invariant 9).

``settings.allowed_modules`` (``QCELERY_ALLOWED_MODULES``) adds to a default list of this
field's packages; the same list decides what a task definition or batch may import
(``class`` / ``module_path`` / ``func``, ``task_func``, ``aggregate``) and what results
and caches may unpickle. Here: the rules, and that a producer refuses before anything is
written; tests/faults/test_task_data.py shows real workers refusing edited pools.
"""

from __future__ import annotations

import pickle
import sys
import types

import numpy as np
import pytest
from cli_support import PROBE, cli_env, error_lines, probe_workflow, qcelery

from qcelery import batch as batches
from qcelery.config import load_workflow
from qcelery.errors import ConfigError, ModuleNotAllowedError, UnsafePickleError
from qcelery.exp import get_experiment
from qcelery.instance import allowed_imports, check_task_names, init_instance_by_config
from qcelery.manage import TaskManager
from qcelery.producer import enqueue
from qcelery.serial import DEFAULT_ALLOWED_MODULES, admit_import, allow_list, dumps, restricted_loads
from qcelery.settings import Settings
from qcelery.trainer import task_train
from qcelery.worker import resolve

SETTING = "QCELERY_ALLOWED_MODULES"


def shell_config(target) -> dict:
    """A model config that, if imported and called, would create ``target``."""
    return {"class": "system", "module_path": "os", "kwargs": {"command": f"touch {target}"}}


@pytest.fixture
def user_module():
    """A module of the user's own, importable by name (as a package on sys.path would be)."""
    mod = types.ModuleType("qc_user_models")
    exec(  # the stand-in for a package of the user's, its classes defined in it
        "import os\nclass MyModel:\n    def __init__(self, depth=1):\n        self.depth = depth\n"
        "def my_task(task_def):\n    return task_def\nsystem = os.system\n",
        mod.__dict__,
    )
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


# ----------------------------------------------------------------------- the rules
@pytest.mark.parametrize(
    ("module", "name", "said"),
    [
        ("os", "system", "module 'os' is not in the allow-list"),
        ("subprocess", "run", "module 'subprocess' is not in the allow-list"),
        ("builtins", "eval", "'eval' loads, imports, evaluates"),
        ("builtins", "exec", "'exec' loads, imports, evaluates"),
        ("posix", "system", "module 'posix' is not in the allow-list"),
        ("qcelery.instance", "init_instance_by_config", "refused even though its parent package is allowed"),
        ("qcelery.worker", "resolve", "refused even though its parent package is allowed"),
        ("numpy", "load", "'load' loads"),
        ("pandas", "read_pickle", "'read_pickle' loads"),
        ("qlib", "init", "'init' loads"),
        ("qcelery.models", "_private", "'_private' is not public"),
        ("/tmp/evil.py", "f", "is not a module name"),
    ],
)
def test_a_name_outside_the_allow_list_is_refused_naming_the_module_and_the_setting(module, name, said):
    with pytest.raises(ModuleNotAllowedError) as info:
        admit_import(module, name, what="model class")
    message = str(info.value)
    assert said in message and f"{module}.{name}" in message and SETTING in message


def test_the_default_list_admits_this_fields_packages_and_matches_whole_package_names():
    assert {"qcelery", "qlib", "lightgbm", "xgboost", "catboost", "sklearn", "torch", "numpy", "pandas"} <= set(DEFAULT_ALLOWED_MODULES)
    from lightgbm import LGBMRegressor
    from sklearn.linear_model import Ridge

    from qcelery.models import LinearModel
    from qcelery.trainer import task_train as train

    assert admit_import("qcelery.models", "LinearModel") is LinearModel
    assert admit_import("qcelery.trainer", "task_train") is train
    assert admit_import("sklearn.linear_model", "Ridge") is Ridge
    assert admit_import("lightgbm", "LGBMRegressor") is LGBMRegressor
    # names only (a producer need not have the packages): qlib's model is admitted unimported
    assert admit_import("qlib.contrib.model.gbdt", "LGBModel", load=False) is None
    # a prefix is a whole package name, never a substring
    for module in ("qcelery_evil", "numpyx.core", "torchvision_hack"):
        with pytest.raises(ModuleNotAllowedError, match=f"module '{module}' is not in the allow-list"):
            admit_import(module, "Thing", load=False)


def test_users_extend_the_list_with_their_own_modules(user_module):
    with pytest.raises(ModuleNotAllowedError, match="module 'qc_user_models' is not in the allow-list"):
        admit_import("qc_user_models", "MyModel")
    assert admit_import("qc_user_models", "MyModel", ["qc_user_models"]) is user_module.MyModel
    assert admit_import("qc_user_models", "my_task", ["qc_user_models:my_task"]) is user_module.my_task
    # trusting a module does not trust what it re-exports from elsewhere
    with pytest.raises(ModuleNotAllowedError, match="'system' loads"):
        admit_import("qc_user_models", "system", ["qc_user_models"])
    assert "qc_user_models" in allow_list(["qc_user_models"])


def test_the_setting_takes_a_json_or_comma_separated_list_and_refuses_a_malformed_entry(monkeypatch):
    monkeypatch.setenv(SETTING, "mypkg, other.mod:Thing")
    assert Settings().allowed_modules == ["mypkg", "other.mod:Thing"]
    monkeypatch.setenv(SETTING, '["mypkg"]')
    assert Settings().allowed_modules == ["mypkg"]
    with pytest.raises(ValueError, match="allowed_modules entry"):
        Settings(allowed_modules=["mypkg", " "])


def test_a_task_definition_is_checked_at_every_depth_and_in_qlib_config_slots(tmp_path):
    target = tmp_path / "ran"
    nested = {
        "model": {"class": "LinearModel", "module_path": "qcelery.models"},
        "dataset": {"class": "DatasetH", "module_path": "qcelery.data", "kwargs": {"handler": shell_config(target)}},
    }
    with pytest.raises(ModuleNotAllowedError, match=r"task 7: dataset\.kwargs\.handler class 'system' os\.system is refused"):
        check_task_names(nested, [], where="task 7")
    as_string = {"model": "subprocess.Popen"}
    with pytest.raises(ModuleNotAllowedError, match="module 'subprocess' is not in the allow-list"):
        check_task_names(as_string, [])
    # Qlib's init_instance_by_config unpickles a file:// string given for a handler
    pickled_file = {"dataset": {"class": "DatasetH", "kwargs": {"handler": f"file://{tmp_path}/h.pkl"}}}
    with pytest.raises(ModuleNotAllowedError, match="Qlib would unpickle that file"):
        check_task_names(pickled_file, [])
    # plain strings elsewhere are data, not code
    check_task_names({"model": {"class": "LinearModel", "module_path": "qcelery.models", "kwargs": {"note": "os.system"}}}, [])
    assert not target.exists()


def test_inside_allowed_imports_every_config_qcelery_builds_is_checked(tmp_path, user_module):
    target = tmp_path / "ran"
    with allowed_imports([]), pytest.raises(ModuleNotAllowedError, match="os.system is refused"):
        init_instance_by_config(shell_config(target))
    assert not target.exists()
    with allowed_imports(["qc_user_models"]):
        assert init_instance_by_config({"class": "MyModel", "module_path": "qc_user_models", "kwargs": {"depth": 3}}).depth == 3
    # outside the block the config is the caller's own code, built as in Qlib
    assert init_instance_by_config({"class": "OrderedDict", "module_path": "collections"}) == {}


def test_resolve_refuses_a_batch_function_outside_the_allow_list(user_module):
    with pytest.raises(ModuleNotAllowedError, match=f"task function 'os.system': os.system is refused.*{SETTING}"):
        resolve("os.system")
    with pytest.raises(ModuleNotAllowedError, match="aggregate function 'subprocess:run'"):
        resolve("subprocess:run", what="aggregate function")
    assert resolve("qc_user_models.my_task", ["qc_user_models"]) is user_module.my_task


# ----------------------------------------------------------------------- producers write nothing
def test_create_task_refuses_a_definition_naming_a_module_outside_the_list_before_writing(settings, mongo_db, tmp_path):
    tm = TaskManager("guarded", settings)
    good = {"model": {"class": "LinearModel", "module_path": "qcelery.models"}, "k": 1}
    bad = {"model": shell_config(tmp_path / "ran"), "k": 2}
    with pytest.raises(ModuleNotAllowedError, match=r"task definition #1 for pool 'guarded': model class 'system' os\.system"):
        tm.create_task([good, bad])
    assert tm.task_pool.count_documents({}) == 0
    # the user's own module, once listed, is accepted (judged by name: the producer imports nothing)
    trusted = TaskManager("guarded", settings.model_copy(update={"allowed_modules": ["mylab"]}))
    assert len(trusted.create_task([{"model": {"class": "Net", "module_path": "mylab.models"}}])) == 1


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"task_func": "os.system"}, "task function 'os.system'"),
        ({"task_func": "builtins.eval"}, "task function 'builtins.eval'"),
        ({"task_func": "qcelery.probes.noop", "aggregate": "subprocess.run"}, "aggregate function 'subprocess.run'"),
        ({"task_func": "qcelery.probes.noop", "aggregate": {"func": "os.system", "kwargs": {}}}, "aggregate function 'os.system'"),
    ],
)
def test_enqueue_refuses_a_batch_function_outside_the_list_with_nothing_written(settings, mongo_db, kwargs, said):
    with pytest.raises(ModuleNotAllowedError, match=said) as info:
        enqueue([{"key": "a"}], "refused_pool", settings=settings, **kwargs)
    assert SETTING in str(info.value)
    assert "refused_pool" not in mongo_db.list_collection_names()
    assert mongo_db[batches.COLLECTION].count_documents({}) == 0


def test_a_workflow_file_naming_a_module_outside_the_list_is_refused_before_it_is_imported(tmp_path, settings):
    wf = probe_workflow(tmp_path / "wf.yaml")
    wf.write_text(wf.read_text().replace("module_path: collections", "module_path: this", 1))  # `import this` prints
    with pytest.raises(ModuleNotAllowedError, match=f"wf.yaml: task: model class 'OrderedDict' this.OrderedDict is refused.*{SETTING}"):
        load_workflow(wf, settings=settings)
    assert "this" not in sys.modules


def test_qcelery_enqueue_of_such_a_workflow_is_one_line_and_writes_nothing(tmp_path, settings, mongo_db):
    wf = probe_workflow(tmp_path / "wf.yaml")
    wf.write_text(
        wf.read_text().replace("class: OrderedDict\n", "class: system\n", 1).replace("module_path: collections", "module_path: os", 1)
    )
    proc = qcelery("enqueue", str(wf), cwd=tmp_path, env=cli_env(settings, QCELERY_TASK_FUNC=PROBE))
    lines = error_lines(proc)
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "os.system is refused" in lines[0] and SETTING in lines[0]
    assert mongo_db.list_collection_names() == []


# ----------------------------------------------------------------------- in-process trainers
def test_task_train_refuses_a_definition_naming_os_system_and_nothing_runs(settings, mongo_db, tmp_path):
    target = tmp_path / "ran"
    task = {
        "model": {"class": "LinearModel", "module_path": "qcelery.models"},
        "dataset": {"class": "DatasetH", "module_path": "qcelery.data", "kwargs": {"handler": shell_config(target), "segments": {}}},
    }
    with pytest.raises(ModuleNotAllowedError, match=f"os.system is refused.*{SETTING}"):
        task_train(task, "exp_refused", settings=settings)
    assert not target.exists()
    (rec,) = get_experiment("exp_refused", settings).list_recorders(rtype="list")
    assert rec.status == "FAILED"


def test_a_module_outside_the_list_is_refused_before_it_is_known_whether_it_imports(settings, mongo_db):
    task = {"model": {"class": "Ridge", "module_path": "no_such_package.models"}, "dataset": {"class": "DatasetH"}}
    with pytest.raises(ModuleNotAllowedError, match="module 'no_such_package.models' is not in the allow-list"):
        task_train(task, "exp_unlisted", settings=settings)
    listed = settings.model_copy(update={"allowed_modules": ["no_such_package"]})
    with pytest.raises(ConfigError, match="cannot import module 'no_such_package.models'"):
        task_train(task, "exp_unlisted", settings=listed)


def test_a_trainer_rm_worker_fails_a_refused_task_at_once_and_trains_the_others(settings, mongo_db, tmp_path):
    from bson import Binary

    from qcelery import status as st
    from qcelery.trainer import TrainerRM

    target = tmp_path / "made-by-model"
    handler = {"class": "SyntheticAlphaHandler", "module_path": "qcelery.data", "kwargs": {"instruments": 5, "seed": 2}}
    segments = {"train": ("2019-01-02", "2019-12-31"), "test": ("2020-01-02", "2020-03-31")}
    good = {
        "model": {"class": "LinearModel", "module_path": "qcelery.models"},
        "dataset": {"class": "DatasetH", "module_path": "qcelery.data", "kwargs": {"handler": handler, "segments": segments}},
    }
    tm = TaskManager("rm_pool", settings)
    good_id, bad_id = tm.create_task([good, {**good, "twin": True}])
    # the pool is edited afterwards: the pull loop meets a definition naming os.system
    edited = {**good, "model": shell_config(target)}
    tm.task_pool.update_one({"_id": bad_id}, {"$set": {"def": Binary(pickle.dumps(edited))}})

    assert TrainerRM("exp_rm_refused", "rm_pool", settings=settings).worker() == 2

    assert not target.exists()
    failed = tm.re_query(bad_id)
    assert (failed["status"], failed["attempt"]) == (st.FAILED, 1), failed["error"]
    assert "os.system is refused" in failed["error"] and SETTING in failed["error"]
    assert tm.re_query(good_id)["status"] == st.DONE


# ----------------------------------------------------------------------- the unpickler, same list
def test_results_of_the_default_packages_unpickle_and_a_refused_global_names_the_setting():
    from sklearn.linear_model import Ridge

    model = Ridge(alpha=0.5).fit(np.arange(10.0).reshape(5, 2), np.arange(5.0))
    back = restricted_loads(dumps(model), context="task 1 res")
    assert back.predict([[1.0, 2.0]]) == pytest.approx(model.predict([[1.0, 2.0]]))

    class Shell:
        def __reduce__(self):
            import os

            return os.system, ("true",)

    with pytest.raises(UnsafePickleError, match=f"posix.system.*{SETTING}"):
        restricted_loads(pickle.dumps(Shell()), context="task 1 res")
