{{/*
Expand the name of the chart.
*/}}
{{- define "ferry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
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
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-cuda" "" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
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
