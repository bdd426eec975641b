"""The examples in the package's docstrings run and print what they show.

Every module of ``companion`` is searched (``doctest``, as
``pytest --doctest-modules`` would, without importing scripts under
``book/``); the public API's main entry points must keep an example.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import numpy as np
import pytest

import companion

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(companion.__path__, "companion.")
    if not info.name.endswith("__main__")
)

MUST_HAVE_EXAMPLES = {
    "companion.functional.batchnorm_forward",
    "companion.functional.batchnorm_backward",
    "companion.functional.batchnorm_inference",
    "companion.functional.batchnorm_inference_backward",
    "companion.gradcheck.numerical_gradient",
    "companion.gradcheck.rel_error",
    "companion.nn.normalization.BatchNorm",
    "companion.nn.activations.ReLU",
    "companion.nn.dense.Dense",
    "companion.nn.losses.softmax_cross_entropy",
    "companion.nn.optimizers.SGD",
    "companion.nn.sequential.Sequential",
}


def examples(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [
        test
        for test in finder.find(module, module_name, extraglobs={"np": np})
        if test.examples
    ]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    for test in examples(module_name):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} example(s) failed"


def test_the_public_api_keeps_its_examples():
    found = {test.name for name in MODULES for test in examples(name)}
    assert not MUST_HAVE_EXAMPLES - found, MUST_HAVE_EXAMPLES - found
    assert len(MODULES) > 20  # every subpackage was walked


def test_a_wrong_example_fails():
    """The runner is not vacuous: a wrong expected output is a failure."""
    parser = doctest.DocTestParser()
    test = parser.get_doctest(">>> 1 + 1\n3\n", {}, "wrong", None, 0)
    runner = doctest.DocTestRunner()
    runner.run(test, out=lambda text: None)
    assert runner.failures == 1
