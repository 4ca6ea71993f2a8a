"""The saliency sanity checks on the model the README's demo trains (``fuselip-med finetune --recipe rocov2_demo``,
about 2 minutes on 2 idle cores; trained once per session): model and text randomisation print their numbers and
pass (measured: rho -0.053 and -0.398, median of 8 images), an explainer that ignores the text fails text
randomisation on the same model (rho 1.000), and the planted pointing game prints its number. It does not pass on
this model, and the reason is the model, not the map: measured 0 of 16 against 0.055 for a random cell, and the
finding raises the demo model's similarity to its caption in only 4 of 16 images (median gain -0.0014 against the
same image drawn without the finding), so the model does not see the finding and a correct map cannot point at it
(the map itself finds the region a model depends on: tests/test_explain.py). Training with hard-negative twins
(each study and its finding-free twin in one batch) did not change that: 1 to 5 of 16, nor did a finer stand-in
tokenizer with the twins, without crops, for 1,200 steps or on 3x the studies (1 to 5 of 16; README "Why did it
match?"). It is a strict xfail that turns red once a demo model that sees its findings passes it.
"""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.explain.occlusion import OcclusionExplainer
from fuselip_med.explain.sanity import model_randomisation, planted_cases, pointing_game, text_randomisation

# the first test trains the demo model (2 minutes on idle cores, more than 10 on a shared machine)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400), pytest.mark.filterwarnings("ignore::UserWarning")]
N_PLANTED = 16  # demo test images for the pointing game
N_RANDOMISATION = 8  # of them, for the two randomisation checks


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory):
    from fuselip_med import load_model

    run = tmp_path_factory.mktemp("rocov2_demo")
    result = CliRunner().invoke(app, ["-q", "finetune", "--recipe", "rocov2_demo", "--set", f"output.dir={run}"])
    assert result.exit_code == 0, result.output
    model, _, _ = load_model(run / "final", "cpu")
    return model


@pytest.fixture(scope="module")
def planted():
    return planted_cases(N_PLANTED)


@pytest.fixture(scope="module")
def explainer():
    return OcclusionExplainer(grid=8, fill="blur", batch_size=32, keep=N_PLANTED + 2)


def test_randomisation_checks_pass_on_the_demo_model(demo_model, planted, explainer):
    cases, _ = planted
    results = [model_randomisation(demo_model, explainer, cases[:N_RANDOMISATION]),
               text_randomisation(demo_model, explainer, cases[:N_RANDOMISATION])]
    for result in results:
        print(result.line())
    assert [r.name for r in results if not r.passed] == []


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="the demo model does not see the planted finding (it raises the similarity in 4 of 16 "
                          "images), so its map maximum is not there (measured 0/16 against 0.055 for a random cell)")
def test_pointing_game_on_planted_findings(demo_model, planted, explainer):
    cases, masks = planted
    result = pointing_game(demo_model, explainer, cases, masks)
    print(result.line())
    assert result.passed


def test_an_explainer_that_ignores_the_text_fails_on_the_demo_model(demo_model, planted, explainer):
    cases, _ = planted

    def ignores_text(model, image, text, *, query_image=None):
        return explainer(model, image, "Axial CT image", query_image=query_image)

    result = text_randomisation(demo_model, ignores_text, cases[:N_RANDOMISATION])
    print(result.line())
    assert not result.passed and result.value == pytest.approx(1.0)
