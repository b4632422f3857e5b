{{/* Names and labels, defined once (prometheus-community / Bitnami conventions). */}}

{{- define "resnet-serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "resnet-serving.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's object name: <fullname>-<component>, at most 63 characters. */}}
{{- define "resnet-serving.componentName" -}}
{{- printf "%s-%s" (include "resnet-serving.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-") .component }}
{{- end }}

{{/* Selector labels: stable across upgrades, so no chart version in them. */}}
{{- define "resnet-serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "resnet-serving.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "resnet-serving.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "resnet-serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: resnet-serving
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "resnet-serving.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "resnet-serving.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "resnet-serving.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
The gateway's key sets: gateway.apiKeys (RESNET_SERVE_API_KEYS) and gateway.adminKeys
(RESNET_SERVE_ADMIN_KEYS). Each comes from a Secret, never a plain value: one the chart
creates from `keys` (named <fullname>-api-keys / -admin-keys, under the key api-keys /
admin-keys), or `existingSecret` under `existingSecretKey`. Called with (dict "root" .
"set" "apiKeys").
*/}}
{{- define "resnet-serving.keysSecret" -}}
{{- $k := index .root.Values.gateway .set }}
{{- if $k.existingSecret }}
{{- $k.existingSecret }}
{{- else if $k.keys }}
{{- include "resnet-serving.componentName" (dict "root" .root "component" (kebabcase .set)) }}
{{- end }}
{{- end }}

{{- define "resnet-serving.keysSecretKey" -}}
{{- $k := index .root.Values.gateway .set }}
{{- if $k.existingSecret }}{{ $k.existingSecretKey }}{{ else }}{{ kebabcase .set }}{{ end }}
{{- end }}

{{/* The Secret holding the API keys, or "" when there are none. */}}
{{- define "resnet-serving.apiKeysSecret" -}}
{{- include "resnet-serving.keysSecret" (dict "root" . "set" "apiKeys") }}
{{- end }}

{{- define "resnet-serving.apiKeysSecretKey" -}}
{{- include "resnet-serving.keysSecretKey" (dict "root" . "set" "apiKeys") }}
{{- end }}

{{/* The repository's PersistentVolumeClaim name (source: pvc). */}}
{{- define "resnet-serving.claimName" -}}
{{- default (include "resnet-serving.componentName" (dict "root" . "component" "models")) .Values.modelRepository.pvc.existingClaim }}
{{- end }}

{{/*
A gateway setting as an environment value. Helm reads every number in values as a float,
which would print 33554432 as 3.3554432e+07: whole numbers are printed as integers, lists
comma-separated (how service/settings.py reads them).
*/}}
{{- define "resnet-serving.settingValue" -}}
{{- if kindIs "slice" . }}{{ join "," . }}
{{- else if and (kindIs "float64" .) (eq . (floor .)) }}{{ int64 . }}
{{- else }}{{ . }}
{{- end }}
{{- end }}

{{/*
Seconds a gateway pod needs to stop without dropping a request: the drain window, then the
longest an accepted request may still run, plus 5 s for the process to exit.
*/}}
{{- define "resnet-serving.gatewayGracePeriod" -}}
{{- $c := .Values.gateway.config }}
{{- $needed := add (ceil (default 0 $c.drainSeconds)) (ceil (default 10 $c.requestTimeoutS)) 5 }}
{{- $set := .Values.gateway.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $set }}{{ $needed }}
{{- else if lt (int $set) (int $needed) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds=%v is shorter than drainSeconds + requestTimeoutS + 5 = %v: pods would be killed while draining or answering" $set $needed) }}
{{- else }}{{ int $set }}
{{- end }}
{{- end }}

{{/* Pod-level pieces shared by every workload. */}}
{{- define "resnet-serving.podSecurity" -}}
automountServiceAccountToken: false
serviceAccountName: {{ include "resnet-serving.serviceAccountName" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The repository volume(s) of a pod; "fetch" adds the init container below. */}}
{{- define "resnet-serving.repositoryVolume" -}}
- name: models
{{- if eq .Values.modelRepository.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "resnet-serving.claimName" . }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.modelRepository.fetch.sizeLimit }}
{{- end }}
{{- end }}

{{- define "resnet-serving.fetchInitContainer" -}}
{{- if eq .Values.modelRepository.source "fetch" }}
{{- $f := .Values.modelRepository.fetch }}
- name: fetch-models
  image: {{ $f.image }}
  command: {{- toYaml $f.command | nindent 4 }}
  env:
    - name: SOURCE_URL
      value: {{ required "modelRepository.fetch.url is required with modelRepository.source=fetch" $f.url | quote }}
    - name: MODEL_REPOSITORY
      value: {{ .Values.modelRepository.mountPath }}
    - name: HOME
      value: /tmp
    {{- with $f.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $f.envFromSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  resources:
    {{- toYaml $f.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ .Values.modelRepository.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* The gateway's Triton endpoint: the headless Service, which resolves to every Triton pod. */}}
{{- define "resnet-serving.tritonUrl" -}}
{{- printf "dns:///%s.%s.svc:%v" (include "resnet-serving.componentName" (dict "root" . "component" "triton")) .Release.Namespace .Values.triton.ports.grpc }}
{{- end }}

{{/*
Triton's image. A release tag (YY.MM...) older than 25.07 fails the render: those releases
have CVE-2025-23319, -23320 and -23334 (server PRs #8269, #8273), which a scanner flags on
sight; triton.image.acceptUnpatched takes one anyway. A tag that is not a release number (a
build of one's own) is not judged.
*/}}
{{- define "resnet-serving.tritonImage" -}}
{{- $i := .Values.triton.image }}
{{- $release := regexFind "^[0-9]{2}[.][0-9]{2}" $i.tag }}
{{- if and $release (lt (float64 $release) 25.07) (not $i.acceptUnpatched) }}
{{- fail (printf "triton.image.tag %s predates Triton 25.07, which fixes CVE-2025-23319, -23320 and -23334: use 25.07 or later, or set triton.image.acceptUnpatched=true" $i.tag) }}
{{- end }}
{{- printf "%s:%s" $i.repository $i.tag }}
{{- end }}
