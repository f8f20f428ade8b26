"""Where sweeps saved before the split of this module (into `ray_search`, `ray_scheduler` and `ray_callbacks`)
find what they pickled: Ray's saved state names each class by module, and `sweep resume` of such a sweep unpickles
`sweep.ray_parts.KDOptunaSearch`, `...ResumableASHA`, `..._open_sweep_study` and the rest. New code imports from
the three modules; nothing new goes here."""
from .ray_callbacks import STORAGE_ERRORS, Progress, StorageFailure, StorageGuard, storage_problem, trial_dirname  # noqa: F401
from .ray_scheduler import ResumableASHA  # noqa: F401
from .ray_search import (FINALISTS_FILE, OF, ROLE, FinalistSearch, FolderSearchGenerator, KDOptunaSearch,  # noqa: F401
                         SweepStudy, _open_sweep_study, finalist_trials, foreign_studies, is_extra, pick_finalists,
                         resuming)
from .samplers import SweepGridSampler  # noqa: F401  (sweeps saved before sweep/samplers.py pickled it here)
