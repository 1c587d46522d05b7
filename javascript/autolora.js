// AutoLoRA tooltips. The texts are not repeated here: they come from the parameter table
// (lib_autolora/params.py), which scripts/autolora.py puts into the page as the data-tooltips
// attribute of #autolora_<tab>_tooltips; each control's DOM id is autolora_<tab>_<name>.
(function() {
    function applyTooltips(tab) {
        var holder = gradioApp().getElementById("autolora_" + tab + "_tooltips");
        if (!holder || !holder.dataset.tooltips) return;
        var tooltips = JSON.parse(holder.dataset.tooltips);
        Object.keys(tooltips).forEach(function(name) {
            var root = gradioApp().getElementById("autolora_" + tab + "_" + name);
            if (!root) return;
            root.title = tooltips[name];
            root.querySelectorAll("label, input, textarea, span, button").forEach(function(el) {
                el.title = tooltips[name];
            });
        });
    }

    onUiLoaded(function() {
        ["txt2img", "img2img"].forEach(applyTooltips);
    });
})();
