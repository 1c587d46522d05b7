// AutoLoRA tooltips. The texts are not repeated here: they come from the parameter table
// (lib_autolora/params.py), which the extension serves at /autolora/v1/params; each control's
// DOM id is autolora_<tab>_<name> (lib_autolora/hosts/common.py: elem_id).
(function() {
    function applyTooltips(table) {
        ["txt2img", "img2img"].forEach(function(tab) {
            table.params.forEach(function(param) {
                var root = gradioApp().getElementById("autolora_" + tab + "_" + param.name);
                if (!root) return;
                root.title = param.tooltip;
                root.querySelectorAll("label, input, textarea, span, button").forEach(function(el) {
                    el.title = param.tooltip;
                });
            });
        });
    }

    function load() {
        var base = (typeof gradio_config !== "undefined" && gradio_config.root) ? gradio_config.root : "";
        fetch(base + "/autolora/v1/params")
            .then(function(response) { return response.ok ? response.json() : null; })
            .then(function(table) { if (table) applyTooltips(table); })
            .catch(function() { /* the tooltips are a nicety; the controls work without them */ });
    }

    onUiLoaded(load);
})();
