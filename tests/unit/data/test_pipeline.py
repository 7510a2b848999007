"""The CPUs a command's data pipeline holds: one count that train, tune and generate all use."""

from aigc_ray.config import load_config
from aigc_ray.data.pipeline import pipeline_cpus
from aigc_ray.generate import cpu_shortage_warning
from aigc_ray.train.driver import training_resource_warning


def test_training_holds_a_read_task_and_its_tokenizer_actors_generation_a_read_and_a_write():
    data = load_config(None, ["data.tokenizer_actors=3", "data.cpus_per_task=0.5"]).data
    assert pipeline_cpus(data) == (1 + 3) * 0.5
    assert pipeline_cpus(data, tokenizing=False, writing=True) == 2 * 0.5


def test_each_command_warns_exactly_where_the_pipeline_no_longer_fits():
    cfg = load_config(None, ["data.tokenizer_actors=3", "data.cpus_per_task=0.5"])
    workers = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    just_fits = workers + pipeline_cpus(cfg.data)
    assert training_resource_warning(cfg, {"CPU": just_fits}) is None
    assert training_resource_warning(cfg, {"CPU": just_fits - 0.5}) is not None
    actors = cfg.generate.concurrency * cfg.generate.cpus_per_actor
    just_fits = actors + pipeline_cpus(cfg.data, tokenizing=False, writing=True)
    assert cpu_shortage_warning(cfg, {"CPU": just_fits}) is None
    assert cpu_shortage_warning(cfg, {"CPU": just_fits - 0.5}) is not None
