"""Background jobs (``QgsTask``): heavy work in ``run()``, QGIS/GUI updates in ``finished()``."""
