import json

import pytest

from runtime.config import DATASETS, load_config_file, load_shipped_config, resolve_config, shipped_categories
from runtime.errors import ConfigError


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_shipped_category_validates(dataset):
    for category in shipped_categories(dataset):
        config = load_shipped_config(dataset, category)
        assert config.object_prompt and config.top_k >= 1
        prompts = config.all_defect_prompts()
        # the reference: three general prompts about the category name, then the category's own
        assert [p.text for p in prompts[:3]] == [f"defect on {category}", f"damage on {category}", f"flaw on {category}"]
        assert len(prompts) == 3 + len(config.defect_prompts)


def test_reference_object_caption_keeps_the_comma():
    config = load_shipped_config("mvtec", "bottle")
    assert config.object_caption == "bottle,"
    paper = load_shipped_config("mvtec", "bottle", {"reference_object_caption": False})
    assert paper.object_caption == "bottle"


def test_mtd_uses_the_ksdd2_property_sentence():
    config = load_shipped_config("mtd", "mtd")
    assert (config.object_count, config.top_k, config.defect_area_ratio) == (1, 5, 0.9)


def test_user_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "part.yaml"
    yaml_file.write_text("object_prompt: gear\nobject_count: 2\ndefect_prompts:\n  - crack\n  - {text: black hole, exclude: gear}\n"
                         "top_k: 3\ndefect_area_ratio: 0.5\noptions: {saliency_mode: nearest, saliency_n: 50}\n")
    config = load_config_file(yaml_file)
    assert config.name == "gear" and config.object_count == 2 and config.object_max_area == 0.5
    assert config.defect_prompts[0].exclude == "gear"
    assert config.options.saliency_mode == "nearest" and config.options.saliency_n == 50
    json_file = tmp_path / "part.json"
    json_file.write_text(json.dumps(config.to_dict()))
    assert load_config_file(json_file) == config


@pytest.mark.parametrize("text, message", [
    ("object_prompt: gear\ndefect_prompts: [crack]\ncolour: red\n", "unknown keys ['colour']"),
    ("defect_prompts: [crack]\n", "missing required key 'object_prompt'"),
    ("object_prompt: gear\ndefect_prompts: [crack]\ntop_k: 0\n", "top_k = 0 is invalid"),
    ("object_prompt: gear\ndefect_prompts: [crack]\ndefect_area_ratio: 1.5\n", "defect_area_ratio = 1.5"),
    ("object_prompt: gear\ndefect_prompts: [crack]\nobject_count: two\n", "object_count = 'two'"),
    ("object_prompt: gear\ndefect_prompts: [{text: ''}]\n", "defect_prompts[0].text is empty"),
    ("object_prompt: gear\ndefect_prompts: [crack]\noptions: {saliency_mode: sideways}\n", "saliency_mode"),
    ("object_prompt: gear\ndefect_prompts: [crack]\noptions: {speed: 11}\n", "unknown options ['speed']"),
    ("object_prompt: gear\ndefect_prompts: [{text: crack, exclude: ''}]\n", "exclude must be a non-empty word"),
    ("object_prompt: gear\ndefect_prompts: [crack]\noptions: {object_iou_threshold: '0.5'}\n", "object_iou_threshold"),
    ("object_prompt: gear\ndefect_prompts: [crack]\noptions: {rescore_gain: .inf}\n", "rescore_gain must be a number"),
    ("object_prompt: gear\ndefect_prompts: [crack]\noptions: {rescore_gain: 1.0e+308}\n", "from 0 to 50"),
    ("object_prompt: gear\ndefect_prompts: [crack]\noptions: {reference_object_caption: 'no'}\n",
     "reference_object_caption must be true or false"),
    ("object_prompt: gear\ndefect_prompts: [crack]\noptions: {decoder_chunk: true}\n", "decoder_chunk"),
    ("object_prompt: gear\ndefect_prompts: [crack]\noptions: {joined_captions: 1}\n", "joined_captions must be true or false"),
    ("object_prompt: gear\ndefect_prompts: [crack]\noptions: {box_threshold: false}\n", "box_threshold"),
    ("object_prompt: [gear\n", "cannot parse"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_bad_configs_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_resolve_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no category 'nope'"):
        resolve_config("mvtec", "nope")
    with pytest.raises(ConfigError, match="unknown dataset"):
        resolve_config("kitti", "car")
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(config=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not both"):
        resolve_config("mvtec", "bottle", tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="a prompt config is needed"):
        resolve_config()
    with pytest.raises(ConfigError, match="--category C is missing"):
        resolve_config("mvtec")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="empty.yaml: empty"):
        resolve_config(config=empty)
