{{/* The release's resource name: the release name, with the chart's unless it already says it. */}}
{{- define "cachalot.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cachalot.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The mirror's pods (and what selects them); the node DaemonSet's pods are told apart by
their component, so that the PodDisruptionBudget and the Services never count them: a budget
whose selector matches DaemonSet pods cannot be computed, and blocks every drain. */}}
{{- define "cachalot.mirrorSelectorLabels" -}}
{{ include "cachalot.selectorLabels" . }}
app.kubernetes.io/component: mirror
{{- end -}}

{{- define "cachalot.labels" -}}
{{ include "cachalot.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cachalot.credentialsSecret" -}}
{{- .Values.credentials.existingSecret | default (printf "%s-credentials" (include "cachalot.fullname" .)) -}}
{{- end -}}

{{- define "cachalot.htpasswdSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-htpasswd" (include "cachalot.fullname" .)) -}}
{{- end -}}

{{/* Whether the replicas form a cluster: more than one needs the shared bucket. */}}
{{- define "cachalot.clustered" -}}
{{- if gt (int .Values.replicas) 1 -}}
{{- if ne .Values.storage.backend "s3" -}}
{{- fail "replicas > 1 needs storage.backend: s3 (and storage.s3): replicas on their own disks would each fetch everything" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/*
The keys of the credentials Secret that cachalot.toml names (each mounted as
/etc/cachalot/secrets/<key>), as a JSON list. A Secret the chart makes must have every one.
*/}}
{{- define "cachalot.credentialKeys" -}}
{{- $keys := list -}}
{{- range .Values.upstreams -}}
{{- if .passwordSecretKey -}}
{{- $keys = append $keys .passwordSecretKey -}}
{{- end -}}
{{- end -}}
{{- if eq .Values.storage.backend "s3" -}}
{{- with .Values.storage.accessKeyIdSecretKey }}{{ $keys = append $keys . }}{{ end -}}
{{- with .Values.storage.secretAccessKeySecretKey }}{{ $keys = append $keys . }}{{ end -}}
{{- end -}}
{{- if include "cachalot.clustered" . -}}
{{- $keys = append $keys (required "cluster.secretKey is needed with replicas > 1" .Values.cluster.secretKey) -}}
{{- end -}}
{{- if not .Values.credentials.existingSecret -}}
{{- range $keys -}}
{{- if not (hasKey $.Values.credentials.values .) -}}
{{- fail (printf "credentials.values has no %q, which cachalot.toml names (or set credentials.existingSecret)" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $keys | uniq | toJson -}}
{{- end -}}

{{/* A TOML table's keys from a map (strings, numbers, booleans and lists of them), one a line. */}}
{{- define "cachalot.tomlKeys" -}}
{{- $lines := list -}}
{{- range $k, $v := . -}}
{{- $lines = append $lines (printf "%s = %s" $k (toJson $v)) -}}
{{- end -}}
{{- join "\n" $lines -}}
{{- end -}}

{{/* The Service's cluster IP and port as a Service link gives them to pods (same namespace). */}}
{{- define "cachalot.serviceLinkURL" -}}
{{- $env := include "cachalot.fullname" . | upper | replace "-" "_" -}}
{{- printf "http://$(%s_SERVICE_HOST):$(%s_SERVICE_PORT_HTTP)" $env $env -}}
{{- end -}}
