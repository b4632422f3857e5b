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
Triton's image. files/triton-releases.yaml lists Triton's releases with the CVEs each one
fixes (NVIDIA's security bulletins). A release tag (YY.MM...) older than a release listed
there fails the render, one line naming the CVEs it lacks and the release that has them all
(with the tag's own suffix); triton.image.acceptUnpatched takes it anyway. A tag that is
not a release number (a build of one's own) is not judged.
*/}}
{{- define "resnet-serving.tritonImage" -}}
{{- $i := .Values.triton.image }}
{{- $release := regexFind "^[0-9]{2}[.][0-9]{2}" $i.tag }}
{{- if and $release (not $i.acceptUnpatched) }}
{{- $data := .Files.Get "files/triton-releases.yaml" | fromYaml }}
{{- if not (kindIs "slice" $data.releases) }}
{{- fail "files/triton-releases.yaml: no list of releases (the chart is incomplete)" }}
{{- end }}
{{- $missing := list }}
{{- $newest := "" }}
{{- range $data.releases }}
{{- $r := toString .release }}
{{- if not (regexMatch "^[0-9]{2}[.][0-9]{2}$" $r) }}
{{- fail (printf "files/triton-releases.yaml: release %s is not YY.MM" $r) }}
{{- end }}
{{- if and .fixes (or (not $newest) (gt (float64 $r) (float64 $newest))) }}
{{- $newest = $r }}
{{- end }}
{{- if lt (float64 $release) (float64 $r) }}
{{- range .fixes }}
{{- $missing = append $missing .cve }}
{{- end }}
{{- end }}
{{- end }}
{{- if $missing }}
{{- fail (printf "triton.image.tag %s lacks fixes for %s: use %s%s or later, or set triton.image.acceptUnpatched=true" $i.tag (join ", " ($missing | uniq | sortAlpha)) $newest (trimPrefix $release $i.tag)) }}
{{- end }}
{{- end }}
{{- printf "%s:%s" $i.repository $i.tag }}
{{- end }}

{{/*
Triton's pod pieces, one definition for both layouts: Triton in pods of its own (the
default), or beside the gateway in each gateway pod (triton.sidecar.enabled), where its
ports are named triton-* (a pod's port names are unique), it takes triton.sidecar.ports
(the gateway's own ports are free), and its gRPC listens on loopback only: the gateway
beside it is its one client.
*/}}
{{- define "resnet-serving.tritonRepository" -}}
{{- ternary "/triton-models" .Values.modelRepository.mountPath .Values.triton.tensorrt.enabled }}
{{- end }}

{{- define "resnet-serving.tritonPorts" -}}
{{- toJson (ternary .Values.triton.sidecar.ports .Values.triton.ports .Values.triton.sidecar.enabled) }}
{{- end }}

{{- define "resnet-serving.tritonInitContainers" -}}
{{- $t := .Values.triton }}
{{- if $t.tensorrt.enabled }}
{{- $repo := include "resnet-serving.tritonRepository" . -}}
# Keeps or builds each model's TensorRT engine for this node's GPU and TensorRT, in the
# pod's copy of the repository; a model whose engine cannot be built loses its
# configs/tensorrt.pbtxt there, so Triton serves its ONNX graph instead.
- name: tensorrt-engines
  image: {{ default (printf "nvcr.io/nvidia/tensorrt:%s" $t.image.tag) $t.tensorrt.image }}
  command:
    - sh
    - -c
    - >-
      cp -R {{ .Values.modelRepository.mountPath }}/. {{ $repo }}/ &&
      exec python3 /scripts/trt_node.py --repository {{ $repo }}{{ if $t.tensorrt.require }} --require{{ end }}
  env:
    - name: HOME
      value: /tmp
  resources:
    {{- $build := deepCopy $t.tensorrt.resources }}
    {{- $_ := set $build "limits" (merge (dict "nvidia.com/gpu" $t.gpus) (default dict $build.limits)) }}
    {{- toYaml $build | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ .Values.modelRepository.mountPath }}
      readOnly: true
    - name: triton-models
      mountPath: {{ $repo }}
    - name: trt-node
      mountPath: /scripts
      readOnly: true
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{- define "resnet-serving.tritonContainer" -}}
{{- $t := .Values.triton }}
{{- $sidecar := $t.sidecar.enabled }}
{{- $ports := include "resnet-serving.tritonPorts" . | fromJson }}
{{- $p := ternary "triton-" "" $sidecar }}
{{- $trt := $t.tensorrt.enabled }}
{{- $repo := include "resnet-serving.tritonRepository" . -}}
- name: triton
  image: {{ include "resnet-serving.tritonImage" . | quote }}
  imagePullPolicy: {{ $t.image.pullPolicy }}
  command: [tritonserver]
  args:
    - --model-repository={{ $repo }}
    # Loads every model of the repository at start, as its config.pbtxt says, and then
    # what the gateway asks for (explicit model control): the gateway loads a new version
    # beside the ones serving and unloads retired ones. Load and unload are repository
    # control, restricted to the admin key below: Triton takes them only with that key. The
    # configs are complete (resnet-export writes them), so nothing is guessed.
    - --model-control-mode=explicit
    - --load-model=*
    - --disable-auto-complete-config
    # Ready once its ports open, which is after the start-up loads (a failed one exits:
    # --exit-on-error). Strict readiness would instead turn the pod NotReady after any
    # failed load request, with the old versions still serving, until that version loads
    # (measured, Triton 2.51): a version that fails would take every Triton pod out of
    # the Service.
    - --strict-readiness=false
    - --exit-on-error=true
    - --exit-timeout-secs={{ $t.exitTimeoutSeconds }}
    - --http-port={{ $ports.http }}
    - --grpc-port={{ $ports.grpc }}
    {{- if $sidecar }}
    - --grpc-address=127.0.0.1
    {{- end }}
    - --metrics-port={{ $ports.metrics }}
    - --allow-metrics=true
    # Client shared memory, repository control, tracing and logging settings answer only
    # to the key in Triton's Secret, which only the gateway is given (it loads and unloads
    # versions, and registers its shared memory) and an operator may read.
    - --http-restricted-api=shared-memory,model-repository,trace,logging:triton-admin-key=$(TRITON_ADMIN_KEY)
    - --grpc-restricted-protocol=shared-memory,model-repository,trace,logging:triton-admin-key=$(TRITON_ADMIN_KEY)
    {{- with ternary "tensorrt" $t.modelConfigName $trt }}
    - --model-config-name={{ . }}
    {{- end }}
    {{- with $t.extraArgs }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  env:
    - name: TRITON_ADMIN_KEY
      valueFrom:
        secretKeyRef:
          name: {{ include "resnet-serving.componentName" (dict "root" . "component" "triton") }}
          key: admin-key
  ports:
    - name: {{ $p }}http
      containerPort: {{ $ports.http }}
      protocol: TCP
    {{- if not $sidecar }}
    - name: grpc
      containerPort: {{ $ports.grpc }}
      protocol: TCP
    {{- end }}
    - name: {{ $p }}metrics
      containerPort: {{ $ports.metrics }}
      protocol: TCP
  startupProbe:
    httpGet: {path: /v2/health/ready, port: {{ $p }}http}
    {{- toYaml $t.probes.startup | nindent 4 }}
  readinessProbe:
    httpGet: {path: /v2/health/ready, port: {{ $p }}http}
    {{- toYaml $t.probes.readiness | nindent 4 }}
  livenessProbe:
    httpGet: {path: /v2/health/live, port: {{ $p }}http}
    {{- toYaml $t.probes.liveness | nindent 4 }}
  {{- if $sidecar }}
  # The gateway beside it stops first (it drains, then finishes what it accepted): Triton
  # takes SIGTERM only once that time is up, so no accepted request finds it gone.
  lifecycle:
    preStop:
      exec:
        command: [sleep, {{ include "resnet-serving.gatewayGracePeriod" . | quote }}]
  {{- end }}
  resources:
    {{- $res := deepCopy $t.resources }}
    {{- if gt (int $t.gpus) 0 }}
    {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $t.gpus) (default dict $res.limits)) }}
    {{- end }}
    {{- toYaml $res | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: {{ ternary "triton-models" "models" $trt }}
      mountPath: {{ $repo }}
      readOnly: true
    - name: tmp
      mountPath: /tmp
    - name: shm
      mountPath: /dev/shm
{{- end }}

{{/* Triton's volumes beside the repository and /tmp: its TensorRT copy, and /dev/shm. */}}
{{- define "resnet-serving.tritonVolumes" -}}
{{- if .Values.triton.tensorrt.enabled -}}
- name: triton-models
  emptyDir:
    sizeLimit: {{ .Values.triton.tensorrt.sizeLimit }}
- name: trt-node
  configMap:
    name: {{ include "resnet-serving.componentName" (dict "root" . "component" "trt-node") }}
{{ end -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ include "resnet-serving.shmSize" . }}
{{- end }}

{{/*
/dev/shm of a Triton pod: triton.shmSizeLimit (Ki/Mi/Gi) for Triton's own use; in sidecar
mode plus the gateway's regions: one per batch in flight (the Triton backend's
max_inflight_batches, 4), each the largest batch of images with their FP32 logits. The pages
are memory, charged to the gateway container that writes them: its memory limit must hold
them too.
*/}}
{{- define "resnet-serving.shmSize" -}}
{{- $t := .Values.triton }}
{{- $q := toString $t.shmSizeLimit }}
{{- $unit := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 }}
{{- $suffix := regexFind "(Ki|Mi|Gi)$" $q }}
{{- if not (regexMatch "^[0-9]+(Ki|Mi|Gi)$" $q) }}
{{- fail (printf "triton.shmSizeLimit %s: give it in Ki, Mi or Gi (e.g. 1Gi)" $q) }}
{{- end }}
{{- $bytes := mul (int64 (trimSuffix $suffix $q)) (index $unit $suffix) }}
{{- if $t.sidecar.enabled }}
{{- $bytes = add $bytes (mul 4 (int64 $t.sidecar.maxBatchSize) (int64 $t.sidecar.bytesPerImage)) }}
{{- printf "%dMi" (div (add $bytes 1048575) 1048576) }}
{{- else }}{{ $q }}
{{- end }}
{{- end }}
