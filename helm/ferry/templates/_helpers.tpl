{{/*
Expand the name of the chart.
*/}}
{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
FERRY_API_KEY from the Secret named by apiKey.existingSecret (nothing when unset), for the clients
the chart runs itself (helm test, the load-test Job).
*/}}
{{- define "ferry.apiKeyEnv" -}}
{{- with .Values.apiKey.existingSecret }}
- name: FERRY_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . | quote }}
      key: {{ $.Values.apiKey.secretKey | quote }}
{{- end }}
{{- end }}

{{/*
Fully qualified app name; also the InferenceService's name. KServe appends -predictor (and
Knative a revision suffix), so it is kept to 45 characters.
*/}}
{{- define "ferry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, as used by the chart label.
*/}}
{{- define "ferry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "ferry.labels" -}}
helm.sh/chart: {{ include "ferry.chart" . }}
{{ include "ferry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ferry
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of the chart's own objects.
*/}}
{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels KServe puts on the predictor pods of this InferenceService (PDB, NetworkPolicy and the
metrics Service select them).
*/}}
{{- define "ferry.predictorPodLabels" -}}
serving.kserve.io/inferenceservice: {{ include "ferry.fullname" . }}
component: predictor
{{- end }}

{{/*
The predictor image: tag defaults to appVersion, with -cuda for GPU pods.
*/}}
{{- define "ferry.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-cuda" "" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Service account of the predictor pods: serviceAccount.name, else the created one, else none.
*/}}
{{- define "ferry.serviceAccountName" -}}
{{- if .Values.serviceAccount.name }}
{{- .Values.serviceAccount.name }}
{{- else if .Values.serviceAccount.create }}
{{- include "ferry.fullname" . }}
{{- end }}
{{- end }}

{{/*
The model's name on the endpoint paths: model.name, or (serving runtime) the InferenceService's
name, which KServe passes to the runtime as --model_name={{.Name}}.
*/}}
{{- define "ferry.modelName" -}}
{{- if .Values.servingRuntime.enabled }}
{{- include "ferry.fullname" . }}
{{- else }}
{{- .Values.model.name }}
{{- end }}
{{- end }}

{{/*
ferry's predictor container, for the InferenceService (root: ., runtime: false) or for the
serving runtime (runtime: true: the model name and storage come from KServe, the device is auto,
GPUs are requested by the InferenceService).
*/}}
{{- define "ferry.container" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $runtime := .runtime }}
{{- $knative := eq $values.deploymentMode "Knative" }}
name: kserve-container
image: {{ include "ferry.image" $root }}
imagePullPolicy: {{ $values.image.pullPolicy }}
command: ["python", "-m", "predictor"]
{{- if $runtime }}
args: ["--model_name={{ "{{.Name}}" }}", "--http_port=8080", "--grpc_port=8081"]
{{- else }}
args: ["--http_port=8080", "--grpc_port=8081"]
{{- end }}
env:
  {{- if not $runtime }}
  # KServe's storage-initializer downloads this to /mnt/models before ferry starts.
  - name: STORAGE_URI
    value: {{ $values.model.storageUri | quote }}
  {{- end }}
  - name: FERRY_MODEL_DIR
    value: /mnt/models
  {{- if not $runtime }}
  - name: FERRY_MODEL_NAME
    value: {{ $values.model.name | quote }}
  {{- end }}
  - name: FERRY_DEVICE
    value: {{ if $runtime }}auto{{ else }}{{ ternary "cuda" "cpu" $values.gpu.enabled }}{{ end }}
  {{- range $key, $value := $values.ferry }}
  - name: FERRY_{{ $key | snakecase | upper }}
    value: {{ $value | toString | quote }}
  {{- end }}
  {{- with $values.apiKey.existingSecret }}
  - name: FERRY_API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ . | quote }}
        key: {{ $values.apiKey.secretKey | quote }}
  {{- end }}
  {{- with $values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $values.envFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
ports:
  - name: http1
    containerPort: 8080
    protocol: TCP
  {{- if not $knative }}
  - name: grpc
    containerPort: 8081
    protocol: TCP
  {{- end }}
readinessProbe:
  httpGet:
    path: /v2/models/{{ if $runtime }}{{ "{{.Name}}" }}{{ else }}{{ $values.model.name }}{{ end }}/ready
    port: 8080
  {{- toYaml $values.probes.readiness | nindent 2 }}
livenessProbe:
  httpGet:
    path: /v2/health/live
    port: 8080
  {{- toYaml $values.probes.liveness | nindent 2 }}
resources:
  {{- if $runtime }}
  {{- toYaml $values.resources | nindent 2 }}
  {{- else }}
  {{- include "ferry.resources" $root | nindent 2 }}
  {{- end }}
securityContext:
  {{- toYaml $values.securityContext | nindent 2 }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
  {{- with $values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/*
Container resources with the GPU added from gpu.* when enabled.
*/}}
{{- define "ferry.resources" -}}
{{- $resources := deepCopy .Values.resources }}
{{- if .Values.gpu.enabled }}
{{- $limits := merge (dict .Values.gpu.resourceName (int .Values.gpu.count)) (default (dict) $resources.limits) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
The predictor pod's volumes: /tmp (the root filesystem is read-only) and extraVolumes.
*/}}
{{- define "ferry.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Per-pod concurrency target: autoscaling.target, else 4/5 of the max batch size.
*/}}
{{- define "ferry.scaleTarget" -}}
{{- if kindIs "invalid" .Values.autoscaling.target }}
{{- max 1 (div (mul (int .Values.ferry.maxBatchSize) 4) 5) }}
{{- else }}
{{- int .Values.autoscaling.target }}
{{- end }}
{{- end }}

{{/*
Knative hard concurrency limit: autoscaling.knative.containerConcurrency, else 2 x max batch size.
*/}}
{{- define "ferry.containerConcurrency" -}}
{{- if kindIs "invalid" .Values.autoscaling.knative.containerConcurrency }}
{{- mul (int .Values.ferry.maxBatchSize) 2 }}
{{- else }}
{{- int .Values.autoscaling.knative.containerConcurrency }}
{{- end }}
{{- end }}

{{/*
PromQL query KEDA scales on.
*/}}
{{- define "ferry.kedaQuery" -}}
{{- if .Values.autoscaling.keda.query }}
{{- .Values.autoscaling.keda.query }}
{{- else }}
{{- printf "sum(%s{namespace=\"%s\",pod=~\"%s-predictor-.*\"})" .Values.autoscaling.keda.metric .Release.Namespace (include "ferry.fullname" .) }}
{{- end }}
{{- end }}

{{/*
In-cluster URL of the predictor (Knative and Standard modes both create <name>-predictor).
*/}}
{{- define "ferry.predictorURL" -}}
{{- printf "http://%s-predictor.%s.svc.cluster.local" (include "ferry.fullname" .) .Release.Namespace }}
{{- end }}
