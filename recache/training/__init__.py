"""Training of the embedded models (``recache pretrain``): the DiT and the FLUX digits model by rectified flow, and the
digit classifier. It sits above ``models`` and ``sampling``, which it uses to write sample grids and model cards."""
