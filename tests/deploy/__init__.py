"""The deployment files (Dockerfile, Helm chart, Prometheus rules, Grafana dashboard),
proved with the real tools `make tools` installs: Helm's engine (helm-python-sdk),
kubernetes-validate, hadolint, promtool. A missing tool fails the test: it is never
skipped, because `make test` installs them."""
