"""A dataset class (an inner WordNet synset such as dog) -> one class of a PartDistillation model."""
import json

import numpy as np
import pytest

from part_distillation.config import ConfigError
from part_distillation.data.part_sample import PartSample
from part_distillation.evaluation.class_map import ModelClassRule, hyponyms, read_class_map, read_hierarchy
from part_distillation.evaluation.predictors import ModelPredictor
from tests.evaluation.test_predictors import _FakeModel

DOG, CAT, PERSON = "n02084071", "n02121808", "n00007846"
# dog -> hunting dog -> {beagle, basset}; dog -> toy dog -> chihuahua; cat -> house cat -> tabby
IS_A = f"""{DOG} n02087122
n02087122 n02088364
n02087122 n02088238
{DOG} n02085374
n02085374 n02085620
{CAT} n02121620
n02121620 n02123045
"""
#: an ImageNet-1k-like model's classes in head order (sorted wnids); none is an inner synset
MODEL = ("n01440764", "n02085620", "n02088238", "n02088364", "n02123045")


@pytest.fixture
def is_a(tmp_path):
    path = tmp_path / "wordnet.is_a.txt"
    path.write_text(IS_A)
    return path


def test_hyponyms_walk_the_whole_subtree(is_a):
    assert hyponyms(DOG, read_hierarchy(is_a)) == {"n02087122", "n02088364", "n02088238", "n02085374", "n02085620"}


def test_an_inner_synset_gets_the_models_first_class_under_it(is_a):
    rule = ModelClassRule.from_files(MODEL, wordnet_is_a=is_a)
    assert rule.index("dog", DOG) == 1        # chihuahua, beagle, basset under dog: the lowest head index
    assert rule.index("cat", CAT) == 4        # tabby
    assert rule.index("person", PERSON) is None   # no class of the model under person
    assert rule.index("fish", "n01440764") == 0   # a class of the model is itself
    assert ModelClassRule(MODEL).index("dog", DOG) is None   # without a hierarchy: the synset only


def test_a_mapping_file_overrides_the_rule(tmp_path, is_a):
    (tmp_path / "map.json").write_text(json.dumps({"dog": "n02088364", PERSON: "n01440764"}))
    (tmp_path / "map.csv").write_text("# dataset class,model wnid\ndog,n02088364\nn00007846,n01440764\n")
    for name in ("map.json", "map.csv"):
        rule = ModelClassRule.from_files(MODEL, class_map_file=tmp_path / name, wordnet_is_a=is_a)
        assert rule.index("dog", DOG) == 3              # by the dataset's class name
        assert rule.index("person", PERSON) == 0        # by its wnid
        assert rule.index("cat", CAT) == 4              # not in the file: the hierarchy
    assert read_class_map(tmp_path / "map.csv") == {"dog": "n02088364", PERSON: "n01440764"}


def test_bad_mapping_files_say_what_to_do(tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"dog": "n99999999"}))
    with pytest.raises(ConfigError, match="not a class of the model"):
        ModelClassRule.from_files(MODEL, class_map_file=tmp_path / "map.json")
    (tmp_path / "bad.csv").write_text("dog\n")
    with pytest.raises(ConfigError, match="bad.csv:1"):
        read_class_map(tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match="does not exist"):
        read_class_map(tmp_path / "missing.json")


def test_model_predictor_scores_a_pascal_dog_with_an_imagenet_1k_model(is_a):
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    sample = PartSample(key="a/0", path="a.jpg", object_class="dog", wnid=DOG, object_mask=mask,
                        part_masks=mask[None], part_ids=np.array([0]))
    image = np.zeros((4, 4, 3), np.uint8)
    model = _FakeModel("part_distillation", mask[None], class_wnids=MODEL)
    exact = ModelPredictor(model, "pd", load_image=lambda p: image)
    assert exact(sample) is None and exact.last_skip == "object_class_not_in_model"   # before: every dog skipped
    predictor = ModelPredictor(model, "pd", load_image=lambda p: image,
                               class_rule=ModelClassRule.from_files(MODEL, wordnet_is_a=is_a))
    assert predictor(sample) is not None
    assert model.calls[-1][2] == 1
