"""A synthetic world to test that the method *learns*: textured-class images with exact masks, and a noisy,
coarse CLIP-like teacher.

- :mod:`.world`: ``SyntheticWorld`` (images, masks, ``write(root, n_train, n_val)`` for the folder dataset reader),
  ``ClassSpec``, ``CLASS_SPECS``;
- :mod:`.teacher`: ``SyntheticTeacher``, the CLIP backend protocol over a world, and the helpers that score it
  (``class_text_embeddings``, ``teacher_segmentation``, ``miou``);
- :mod:`.presets`: the family of worlds (``WORLDS``, ``world_from_preset``, ``class_family``, ``spurious_specs``)
  and ``make_teacher``, the backend factory configs name: ``clip.backend: clips4.synthetic:make_teacher`` with
  ``backend_params`` naming the world and the teacher's params;
- :mod:`.build`: ``build_world``, a world with its config files and caches, ready to train on.

This package sits above :mod:`clips4.pipeline`: the pipeline reaches the teacher only through that configured
backend string, never by an import.
"""
from clips4.synthetic.build import BuiltWorld, build_world
from clips4.synthetic.presets import PATTERNS, WORLDS, class_family, make_teacher, spurious_specs, world_from_preset
from clips4.synthetic.teacher import CUES, SyntheticTeacher, class_text_embeddings, miou, teacher_segmentation
from clips4.synthetic.world import CLASS_SPECS, ClassSpec, SyntheticWorld

__all__ = ["BuiltWorld", "build_world", "CLASS_SPECS", "ClassSpec", "CUES", "PATTERNS", "WORLDS", "class_family", "spurious_specs",
           "world_from_preset", "make_teacher", "SyntheticWorld", "SyntheticTeacher", "class_text_embeddings",
           "teacher_segmentation", "miou"]
