# CONFIG for eval.sh: the module's own option declarations as documentation
# (lib.optionAttrSetToDocList, as nixpkgs' manual builds its option pages), read by
# .ci/nixos-options as `sistemaOptionDocs`. Nothing is enabled: defaults print as their
# `defaultText`, or as the value they have with nothing else set.
{ lib, options, ... }:
{
  config.system.stateVersion = "26.11";
  options.sistemaOptionDocs = lib.mkOption {
    type = lib.types.anything;
    readOnly = true;
    default =
      map
        (o: {
          inherit (o) name type readOnly;
          description = o.description or "";
          default = o.default.text or null;
          defaultIsProse = (o.default._type or "") == "literalMD";
          example = o.example.text or null;
        })
        (
          lib.filter (o: o.visible && !o.internal) (
            lib.optionAttrSetToDocList options.services.sistema-mensajes
          )
        );
  };
}
