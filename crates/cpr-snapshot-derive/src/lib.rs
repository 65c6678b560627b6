// Copyright 2026 The cpr-rs authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

#![doc = include_str!("../README.md")]
use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::{format_ident, quote};
use syn::{parse_macro_input, spanned::Spanned, Data, DeriveInput, Fields, LitStr};

/// Derives how a type is saved in a snapshot (for types nested in sections).
#[proc_macro_derive(State, attributes(state))]
pub fn derive_state(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match state(&input) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Derives [`State`](derive@State) and `cpr_snapshot::Section` from
/// `#[section(name = "...")]` (and `skippable`).
#[proc_macro_derive(Section, attributes(state, section))]
pub fn derive_section(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    let r = state(&input).and_then(|mut t| {
        t.extend(section(&input)?);
        Ok(t)
    });
    match r {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

struct Field {
    ident: syn::Ident,
    ty: syn::Type,
    since: u16,
    until: u16,
    default: Option<syn::Path>,
}

impl Field {
    fn exists_at(&self, v: u16) -> bool {
        v >= self.since && (self.until == 0 || v < self.until)
    }
}

fn field_attrs(f: &syn::Field) -> syn::Result<Field> {
    let ident = f
        .ident
        .clone()
        .ok_or_else(|| syn::Error::new(f.span(), "only named fields are supported"))?;
    let mut field = Field {
        ident,
        ty: f.ty.clone(),
        since: 1,
        until: 0,
        default: None,
    };
    for attr in f.attrs.iter().filter(|a| a.path().is_ident("state")) {
        attr.parse_nested_meta(|meta| {
            let version = |meta: &syn::meta::ParseNestedMeta| -> syn::Result<u16> {
                let lit: syn::LitInt = meta.value()?.parse()?;
                let v: u16 = lit.base10_parse()?;
                if v == 0 {
                    return Err(meta.error("versions start at 1"));
                }
                Ok(v)
            };
            if meta.path.is_ident("since") {
                field.since = version(&meta)?;
            } else if meta.path.is_ident("until") {
                field.until = version(&meta)?;
            } else if meta.path.is_ident("default") {
                let s: LitStr = meta.value()?.parse()?;
                field.default = Some(s.parse()?);
            } else {
                return Err(meta.error("expected `since`, `until` or `default`"));
            }
            Ok(())
        })?;
    }
    if field.until != 0 && field.until <= field.since {
        return Err(syn::Error::new(f.span(), "`until` must be after `since`"));
    }
    Ok(field)
}

fn private() -> Tokens {
    quote!(::cpr_snapshot::__private::versionize)
}

fn state(input: &DeriveInput) -> syn::Result<Tokens> {
    let v = private();
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let (version, ser, de) = match &input.data {
        Data::Struct(s) => struct_body(s)?,
        Data::Enum(e) => enum_body(e)?,
        Data::Union(u) => {
            return Err(syn::Error::new(
                u.union_token.span,
                "unions cannot be saved",
            ))
        }
    };
    Ok(quote! {
        impl #impl_generics #v::Versionize for #ident #ty_generics #where_clause {
            fn serialize<W: ::std::io::Write>(
                &self,
                writer: &mut W,
                version_map: &#v::VersionMap,
                app_version: u16,
            ) -> #v::VersionizeResult<()> {
                #[allow(unused_variables)]
                let version = version_map
                    .get_type_version(app_version, <Self as #v::Versionize>::type_id());
                #ser
            }

            fn deserialize<R: ::std::io::Read>(
                mut reader: &mut R,
                version_map: &#v::VersionMap,
                app_version: u16,
            ) -> #v::VersionizeResult<Self> {
                #[allow(unused_variables)]
                let version = version_map
                    .get_type_version(app_version, <Self as #v::Versionize>::type_id());
                #de
            }

            fn version() -> u16 {
                #version
            }
        }

        impl #impl_generics ::cpr_snapshot::State for #ident #ty_generics #where_clause {}
    })
}

fn struct_body(s: &syn::DataStruct) -> syn::Result<(u16, Tokens, Tokens)> {
    let v = private();
    let fields: Vec<Field> = match &s.fields {
        Fields::Named(named) => named
            .named
            .iter()
            .map(field_attrs)
            .collect::<syn::Result<_>>()?,
        Fields::Unit => Vec::new(),
        Fields::Unnamed(u) => {
            return Err(syn::Error::new(
                u.span(),
                "only structs with named fields are supported",
            ))
        }
    };
    let version = fields
        .iter()
        .map(|f| f.since.max(f.until))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ser_arms = Tokens::new();
    let mut de_arms = Tokens::new();
    for ver in 1..=version {
        let mut ser = Tokens::new();
        let mut de = Tokens::new();
        for f in &fields {
            let id = &f.ident;
            let ty = &f.ty;
            if f.exists_at(ver) {
                ser.extend(quote! {
                    #v::Versionize::serialize(&self.#id, writer, version_map, app_version)?;
                });
                de.extend(quote! {
                    #id: <#ty as #v::Versionize>::deserialize(&mut reader, version_map, app_version)?,
                });
            } else {
                let value = match &f.default {
                    Some(p) if p.get_ident().is_some() => quote!(Self::#p(version)),
                    Some(p) => quote!(#p(version)),
                    None => quote!(::core::default::Default::default()),
                };
                de.extend(quote! { #id: #value, });
            }
        }
        ser_arms.extend(quote! { #ver => { #ser Ok(()) } });
        de_arms.extend(quote! { #ver => Ok(Self { #de }), });
    }
    let unknown = quote! {
        other => Err(#v::VersionizeError::Deserialize(format!(
            "{} has no version {}", ::core::any::type_name::<Self>(), other
        ))),
    };
    let unknown_ser = quote! {
        other => Err(#v::VersionizeError::Serialize(format!(
            "{} has no version {}", ::core::any::type_name::<Self>(), other
        ))),
    };
    Ok((
        version,
        quote! { match version { #ser_arms #unknown_ser } },
        quote! { match version { #de_arms #unknown } },
    ))
}

fn enum_body(e: &syn::DataEnum) -> syn::Result<(u16, Tokens, Tokens)> {
    let v = private();
    let mut ser = Tokens::new();
    let mut de = Tokens::new();
    for (index, variant) in e.variants.iter().enumerate() {
        if let Some(a) = variant.attrs.iter().find(|a| a.path().is_ident("state")) {
            return Err(syn::Error::new(
                a.span(),
                "versioned enum variants are not supported",
            ));
        }
        let index = index as u32;
        let id = &variant.ident;
        match &variant.fields {
            Fields::Unit => {
                ser.extend(quote! {
                    Self::#id => #v::Versionize::serialize(&#index, writer, version_map, app_version),
                });
                de.extend(quote! { #index => Ok(Self::#id), });
            }
            Fields::Unnamed(u) => {
                let names: Vec<syn::Ident> = (0..u.unnamed.len())
                    .map(|i| format_ident!("data_{}", i))
                    .collect();
                let tys: Vec<&syn::Type> = u.unnamed.iter().map(|f| &f.ty).collect();
                ser.extend(quote! {
                    Self::#id(#(#names),*) => {
                        #v::Versionize::serialize(&#index, writer, version_map, app_version)?;
                        #( #v::Versionize::serialize(#names, writer, version_map, app_version)?; )*
                        Ok(())
                    }
                });
                de.extend(quote! {
                    #index => {
                        #( let #names = <#tys as #v::Versionize>::deserialize(&mut reader, version_map, app_version)?; )*
                        Ok(Self::#id(#(#names),*))
                    }
                });
            }
            Fields::Named(n) => {
                return Err(syn::Error::new(
                    n.span(),
                    "enum variants with named fields are not supported; use a struct",
                ))
            }
        }
    }
    Ok((
        1,
        quote! { match self { #ser } },
        quote! {
            let index = <u32 as #v::Versionize>::deserialize(&mut reader, version_map, app_version)?;
            match index {
                #de
                other => Err(#v::VersionizeError::Deserialize(format!(
                    "{} has no variant {}", ::core::any::type_name::<Self>(), other
                ))),
            }
        },
    ))
}

fn section(input: &DeriveInput) -> syn::Result<Tokens> {
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let mut name: Option<LitStr> = None;
    let mut skippable = false;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("section")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                name = Some(meta.value()?.parse()?);
            } else if meta.path.is_ident("skippable") {
                skippable = true;
            } else {
                return Err(meta.error("expected `name = \"...\"` or `skippable`"));
            }
            Ok(())
        })?;
    }
    let name = name.ok_or_else(|| {
        syn::Error::new(
            input.ident.span(),
            "a section needs #[section(name = \"...\")]",
        )
    })?;
    let n = name.value();
    if n.is_empty()
        || n.len() > 64
        || !n
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b))
    {
        return Err(syn::Error::new(
            name.span(),
            "a section name is 1 to 64 bytes of a-z, 0-9, `_`, `-`, `.`",
        ));
    }
    Ok(quote! {
        impl #impl_generics ::cpr_snapshot::Section for #ident #ty_generics #where_clause {
            const NAME: &'static str = #name;
            const SKIPPABLE: bool = #skippable;
        }
    })
}
