"""The MONAI Label app folder of medssl: ``monailabel start_server --app <this folder> --studies DIR
--conf models_dir M [--conf bundles a,b] [--conf kind brats|nuclei]`` (``medssl label serve`` runs it).
MONAI Label loads this file and uses its MONAILabelApp subclass, medssl.label.tasks.MedsslApp."""

from medssl.label.tasks import MedsslApp  # noqa: F401
