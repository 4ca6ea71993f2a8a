"""Why did it match? Occlusion-sensitivity maps of a FuseLIP similarity (``occlusion``), drawn over the image
(``overlay``) and checked against the saliency sanity checks of Adebayo et al. 2018 (``sanity``)."""
