"""Loss heads of the SigLIP 2 objective."""
