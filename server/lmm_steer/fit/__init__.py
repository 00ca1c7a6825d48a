"""``lmm-steer preset fit``: a steering preset fitted on labelled examples to make a model right
more often, at the population level (every input gets the same edits), as SAVE does for
grounded answers.

From labelled questions (the scenes generator's LLaVA JSONL, or a user's own in that format) the
model answers each one; its SAE codes at the hook block, pooled over the image's positions and
over the question's, are what the candidates are built from:

- ``probe``: a sparse (L1) logistic probe on the codes that tells right answers from wrong ones;
  its features that predict "right" are amplified, those that predict "wrong" suppressed (SAVE);
- ``confusion``: for each of the model's most frequent confusions (purple read as blue, "no" to an
  object that is there), a probe on that confusion's questions alone, steered the same way;
- ``values`` (opt-in, ``--value-strengths``): per question type, each of its values' best-measured
  feature (the catalog's ``sae effects`` rows) amplified where it fires, on that type's prompts;
- ``spotlight`` (``--spotlight-strengths``; scenes with masks): on a question naming a value ("the
  hexagon"), the asked attribute's localised features scaled where the named value's feature fires,
  each named value's edits conditioned on its word in the question's text (``fit.spotlight``).

Each candidate is tried at a grid of strengths, modes and scopes on a selection split, and the
one with the most fixed minus broken answers is kept (then the next candidates are added while
they add to it), under the constraint that no question type loses more than a point. The test
split is never read here: ``lmm-steer eval fitted`` measures the preset beside its controls.
"""
