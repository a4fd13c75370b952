"""Arrival shapes beyond a steady rate: ramps (:mod:`.ramp`), trace replay (:mod:`.replay`) and multi-turn
sessions (:mod:`.sessions`). Each is one small class behind the strategy interface of
:mod:`pikeclient.run.load`, chosen by ``load.kind`` (``conf/load/*.yaml``)."""
