"""What the tests share, imported by module (``from tests.helpers.images import
image_bytes``): paths and tools, the console scripts, published models, image files, time
without sleeps, test doubles, metrics, error shapes, Triton, containers, the Dockerfile's
and PromQL's readers. conftest.py files hold fixtures only, and no test imports another
test module."""
