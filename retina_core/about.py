"""The version and the disclaimer every page, report and export shows (re-exported by `retina_core`)."""

__version__ = "0.1.0"
DISCLAIMER = ("Research software, not a medical device. Suggestions are not a diagnosis. Some bundled models were "
              "trained on small real public image sets (each result names its set and held-out figure), the others "
              "on synthetic phantoms only; no figure here is clinical accuracy.")
