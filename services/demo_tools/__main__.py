"""`python -m services.demo_tools`: serve the demo tools over stdio."""

from services.demo_tools.server import app

app.run()
