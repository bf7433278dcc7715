"""dicomfl.workbench: what combines the site and the coordinator, above both.

The command line, the demo federation on loopback (``launcher``), the benchmark (``bench``,
``benchreport``, ``benchdeploy``), the in-process grid (``inprocess``) and the generated cohort
(``synth``). Nothing in ``dicomfl.common``, ``dicomfl.client`` or ``dicomfl.server`` imports it.
"""
