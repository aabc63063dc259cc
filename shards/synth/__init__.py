"""Synthetic person re-identification datasets, written in the *real* on-disk layouts.

``python -m shards.synth --layout market1501 --out DIR --ids 100 --cams 6 --seed 0`` writes a folder
that the real parsers, the packer and the whole training pipeline accept as if it were Market-1501
(likewise ``dukemtmc``, ``msmt17`` (V1 list layout) and ``cuhk03np`` (detected + labeled)).

The persons are meant to be hard enough to mean something:

* **Parts shared across identities.** A person is a combination of hair (style, colour), upper
  clothes (colour, pattern, sleeves, a front print), lower clothes (colour, trousers/shorts/skirt),
  shoes, a bag (none/backpack/handbag/shoulder bag, side, colour), skin tone and body proportions.
  Each attribute value is dealt out in a *balanced* way within the train and the test identities, so
  every value is worn by several persons: identities differ by combinations of parts only.
* **Cameras** have their own viewpoint statistics (front/back/side decide which parts are visible: a
  backpack is a big patch from the back and two straps from the front, a chest print is front-only),
  their own lighting (gain, colour cast, gamma, side light, blur, noise), framing (scale, aspect) and
  their own background scene with clutter.
* **Domains** (``--domain``) have their own style: a hue/saturation shift of the clothing palette,
  the colours in fashion and the attribute priors (sleeves, skirts, bags, ...), background texture
  families and colours, illumination statistics, blur (optics/resolution), noise, JPEG quality,
  occlusion rate and framing. The style depends on the domain alone (not on the seed), so "domain A"
  is the same style for every seed; by default the domain is the layout name, so synthetic Market
  and synthetic Duke differ in style the way the real ones do.
* **Per image**: view, pose (position, scale, shear, arm swing, stride), a time-of-day session
  (Market's ``s`` field, MSMT17's time slot) that modulates the light, occluders, a JPEG quality.

Train and test identities are disjoint and every query has a cross-camera match (the protocol is
in ``names``).

Every image is drawn from its own ``numpy.random.Generator`` derived from
(seed, domain, kind, identity, camera, image): the output does not depend on iteration order or on
the number of worker processes, and the same arguments give byte-identical files. ``OUT/synth.json``
(config and counts) is written last: its presence means the dataset is complete.

Only numpy and Pillow are used (no torch): this package runs where the packer runs.

Modules, bottom up: ``streams`` (keyed random generators, domain ids), ``parts`` (palettes and
attributes), ``config`` (:class:`~shards.synth.config.SynthConfig`, ``SynthSummary``), ``style``
(domain style, cameras, scenes), ``people`` (identities), ``render`` (one image), ``names`` (the plan:
which images, which file names), ``write`` (:func:`~shards.synth.write.synthesize`), ``cli``.
"""
