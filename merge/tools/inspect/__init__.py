"""``merge inspect``: the report (:mod:`.report`), the stitch view (:mod:`.stitch_view`), Netron (:mod:`.netron`)."""
