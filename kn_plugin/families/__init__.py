"""Model families as data: where each family's neurons live (:mod:`~kn_plugin.families.adapter`) and
the hand-written steppers of the fast engine (:mod:`~kn_plugin.families.steppers`)."""
