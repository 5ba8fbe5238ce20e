"""The pipeline: stages behind one registry (:mod:`.stages`), quantization (:mod:`.quantize`), the
variant tree and its cache (:mod:`.variants`), evaluation, the report and the CI gate (:mod:`.check`)."""
