"""One module per model family: ``build(seed=0, ...)`` returns the tiny pipeline, ``CALL`` the keyword arguments
of a quick call. ``negguide.tiny`` finds every module here."""
