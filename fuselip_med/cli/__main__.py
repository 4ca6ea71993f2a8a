"""``python -m fuselip_med.cli`` (and ``accelerate launch -m fuselip_med.cli``) runs the ``fuselip-med`` command."""
from fuselip_med.cli import main

main()
